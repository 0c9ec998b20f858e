"""The one helper per job that the rest of the package shares: label checks, atomic writes, JSON / YAML readers,
seeds, configuration flattening, dataset statistics."""
import json
import os

import numpy as np
import pytest
import torch

from ncl_hub import files
from ncl_hub.config import RunConfig, flat_config, parse_args
from ncl_hub.labels import as_label_array, check_labels
from ncl_hub.models.normalization import CIFAR10_MEAN, CIFAR10_STD
from ncl_hub.seeding import derive_seed, seed_words


def test_check_labels_names_the_first_bad_label_and_counts_them():
    check_labels([0, 1, 2], 3)
    check_labels(torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 4\).*; 2 label\(s\) out of range"):
        check_labels(torch.tensor([0, 7, 9]), 4, what="target")
    with pytest.raises(ValueError, match=r"labels\[2\] = -1 is negative"):
        check_labels(np.array([0, 1, -1]))
    with pytest.raises(ValueError, match="integer class indices, got dtype torch.float"):
        check_labels([0.0, 1.5])
    assert as_label_array(torch.tensor([2, 0], dtype=torch.int32)).dtype == np.int64
    assert as_label_array([]).shape == (0,)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "record.json"
    files.write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind


def test_atomic_folder_replaces_a_folder_only_when_complete(tmp_path):
    folder = tmp_path / "export"
    with files.atomic_folder(folder) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with files.atomic_folder(folder) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(folder)) == ["a.txt"] and len(list(tmp_path.iterdir())) == 1


def test_json_and_yaml_readers_name_a_damaged_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "page.json").write_text("<html>404</html>")
    with pytest.raises(files.DamagedFileError, match=r"bad.yaml is not valid YAML"):
        files.read_yaml(tmp_path / "bad.yaml")
    with pytest.raises(files.DamagedFileError, match="not the mapping expected"):
        files.read_yaml(tmp_path / "list.yaml")
    with pytest.raises(files.DamagedFileError, match="an HTML or XML page"):
        files.read_json(tmp_path / "page.json")
    assert files.read_json(tmp_path / "missing.json", missing_ok=True) is None
    assert files.read_yaml(tmp_path / "missing.yaml", missing_ok=True) is None


def test_seeds_are_the_streams_they_always_were():
    # the samplers' and the tensor pipeline's seeds, as they were computed before this helper existed
    state = np.random.SeedSequence([7, 3]).generate_state(2, dtype=np.uint32)
    assert derive_seed(7, 3) == (int(state[0]) << 31) ^ int(state[1])
    assert seed_words(7, 3, 11) == [int(w) for w in np.random.SeedSequence([7, 3, 11]).generate_state(2)]
    assert derive_seed(7, 3) != derive_seed(7, 4) != derive_seed(8, 3)


def test_flat_config_opens_the_sections_only():
    cfg = parse_args(["--optim.lr", "0.05", "--model.backbone_kwargs", '{"drop_rate": 0.1}'])
    flat = flat_config(cfg)
    assert flat["optim.lr"] == 0.05 and flat["model.backbone_kwargs"] == {"drop_rate": 0.1}
    assert flat["epochs"] == RunConfig().epochs and "optim" not in flat


def test_cifar_statistics_are_the_released_ones():
    from ncl_hub.models import PAPER_MODELS  # noqa: F401  (registers the models)
    import timm

    cfg = timm.create_model("ncl_resnet32_cifar10lt").pretrained_cfg
    assert tuple(cfg["mean"]) == CIFAR10_MEAN and tuple(cfg["std"]) == CIFAR10_STD

import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ncl_hub.data import (
    class_counts, is_balanced, load_benchmark, load_digits_demo, load_image_dataset, load_inaturalist,
    load_split_file, long_tailed_counts, make_long_tailed, prepare_long_tailed, split_validation,
)


def _label_dataset(counts, names=None) -> datasets.Dataset:
    """Labels in interleaved order, an ``idx`` column, and image paths that do not exist: any decoding would fail."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    class_label = datasets.ClassLabel(names=names) if names else datasets.ClassLabel(num_classes=len(counts))
    features = datasets.Features({"image": datasets.Image(), "label": class_label, "idx": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": [f"/does/not/exist/{i}.png" for i in range(len(labels))], "label": labels.tolist(),
         "idx": list(range(len(labels)))}, features=features)


@pytest.fixture(scope="module")
def digits():
    return load_digits_demo()


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    from conftest import CIFAR10_DIR
    if not (CIFAR10_DIR / "train.parquet").exists():
        pytest.skip(f"shared CIFAR-10 parquet not found at {CIFAR10_DIR}")
    return load_image_dataset(str(CIFAR10_DIR), cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


# ---------------------------------------------------------------------------------------------------------------
# counts


@pytest.mark.parametrize("n_max,num_classes,imbalance_factor,total", [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (500, 100, 100, 10847), (500, 100, 50, 12608)])
def test_cifar_lt_totals(n_max, num_classes, imbalance_factor, total):
    counts = long_tailed_counts(n_max, num_classes, imbalance_factor)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == n_max // imbalance_factor
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_long_tailed_counts_profiles_and_errors():
    assert long_tailed_counts(100, 4, 1) == [100] * 4
    assert long_tailed_counts(100, 4, 10, profile="step") == [100, 100, 10, 10]
    assert long_tailed_counts(100, 5, 10, profile="step") == [100, 100, 10, 10, 10]
    assert long_tailed_counts(100, 1, 10) == [100]
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tailed_counts(100, 10, 0.5)
    with pytest.raises(ValueError, match="exp, step"):
        long_tailed_counts(100, 10, 10, profile="linear")


def test_class_counts_and_balance():
    ds = _label_dataset([5, 3, 0, 2])
    assert class_counts(ds, 4) == [5, 3, 0, 2]
    assert class_counts([0, 0, 3], 4) == [2, 0, 0, 1]
    assert class_counts(torch.tensor([1, 1]), 2) == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        class_counts([0, 4], 4)
    assert is_balanced([100, 104, 96]) and not is_balanced([100, 50]) and not is_balanced([3, 0])
    assert is_balanced([100, 150], tolerance=0.5)


# ---------------------------------------------------------------------------------------------------------------
# long-tailed subsets


def test_make_long_tailed_counts_order_and_no_decoding():
    ds = _label_dataset([200] * 5)
    lt = make_long_tailed(ds, 10)
    assert class_counts(lt, 5) == long_tailed_counts(200, 5, 10)
    idx = lt["idx"]
    assert list(idx) == sorted(idx)  # original order kept
    assert lt.features == ds.features
    # seeded: the same seed gives the same subset, another seed another one
    assert list(make_long_tailed(ds, 10, seed=0)["idx"]) == list(idx)
    assert list(make_long_tailed(ds, 10, seed=1)["idx"]) != list(idx)


def test_make_long_tailed_without_seed_keeps_the_first_images():
    ds = _label_dataset([50] * 3)
    lt = make_long_tailed(ds, 5, seed=None)
    labels = np.asarray(ds["label"])
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n]
                                       for c, n in enumerate(long_tailed_counts(50, 3, 5))]))
    assert list(lt["idx"]) == expected.tolist()


def test_make_long_tailed_class_order_and_profiles():
    ds = _label_dataset([100] * 4)
    assert class_counts(make_long_tailed(ds, 10, class_order=[3, 2, 1, 0]), 4) == long_tailed_counts(100, 4, 10)[::-1]
    assert class_counts(make_long_tailed(ds, 10, profile="step"), 4) == [100, 100, 10, 10]
    with pytest.raises(ValueError, match="permutation"):
        make_long_tailed(ds, 10, class_order=[0, 0, 1, 2])


def test_make_long_tailed_names_an_empty_class():
    ds = _label_dataset([50] * 3, names=["cat", "dog", "newt"])
    with pytest.raises(ValueError, match=r"class 2 \('newt'\) would keep 0 images"):
        make_long_tailed(ds, 100)


def test_make_long_tailed_cifar10(cifar10):
    train = cifar10["train"]
    for imbalance_factor, total in ((100, 12406), (50, 13996)):
        lt = make_long_tailed(train, imbalance_factor)
        assert len(lt) == total
        assert class_counts(lt, 10) == long_tailed_counts(5000, 10, imbalance_factor)
    assert len(cifar10["test"]) == 10000 and class_counts(cifar10["test"], 10) == [1000] * 10


def test_prepare_long_tailed(caplog):
    balanced = _label_dataset([60] * 3)
    lt = prepare_long_tailed(balanced, 10, seed=0)
    assert class_counts(lt, 3) == long_tailed_counts(60, 3, 10)
    assert prepare_long_tailed(balanced, None) is balanced
    with caplog.at_level(logging.INFO, logger="ncl_hub.data"):
        again = prepare_long_tailed(lt, 10)
    assert again is lt and "already long-tailed" in caplog.text


def test_split_validation():
    ds = _label_dataset([100, 30, 9, 1])
    train, val = split_validation(ds, per_class=20, seed=0)
    assert class_counts(val, 4) == [20, 15, 4, 0]
    assert class_counts(train, 4) == [80, 15, 5, 1]
    train_idx, val_idx = set(train["idx"]), set(val["idx"])
    assert not train_idx & val_idx and train_idx | val_idx == set(range(len(ds)))
    assert list(val["idx"]) == sorted(val["idx"])
    assert list(split_validation(ds, per_class=20, seed=0)[1]["idx"]) == list(val["idx"])
    assert list(split_validation(ds, per_class=20, seed=1)[1]["idx"]) != list(val["idx"])
    train0, val0 = split_validation(ds, per_class=0)
    assert len(val0) == 0 and val0.features == ds.features and len(train0) == len(ds)


def test_split_validation_leaves_the_test_split_alone(digits):
    test_before = digits["test"]["label"][:]
    train, val = split_validation(digits["train"], per_class=5)
    assert len(train) + len(val) == len(digits["train"])
    assert len(digits["test"]) == 440 and digits["test"]["label"][:] == test_before


# ---------------------------------------------------------------------------------------------------------------
# sources


def test_digits_demo(digits):
    assert set(digits) == {"train", "val", "test"}
    # validation from the images the long tail left out: the training split is whole, the head class gives none
    assert class_counts(digits["val"], 10) == [0] + [20] * 9
    for split in digits.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == [str(i) for i in range(10)]
    image = digits["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    test_counts = class_counts(digits["test"], 10)
    assert len(set(test_counts)) == 1
    train_counts = class_counts(digits["train"], 10)
    assert 8 <= train_counts[0] / train_counts[-1] <= 12 and 400 < sum(train_counts) < 700
    assert load_image_dataset("digits")["train"]["label"][:] == digits["train"]["label"][:]


def _write_parquet_splits(digits, folder, **rename):
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.parquet"), ("test", "test-00000-of-00001.parquet")):
        ds = digits[split].select(range(12)).flatten_indices()
        ds = ds.rename_columns(rename) if rename else ds
        ds.to_parquet(str(folder / name))


def test_parquet_folder_and_file(digits, tmp_path):
    _write_parquet_splits(digits, tmp_path / "pq", image="img", label="fine_label")
    dd = load_image_dataset(str(tmp_path / "pq"), cache_dir=str(tmp_path / "cache"))
    assert set(dd) == {"train", "test"} and len(dd["train"]) == 12 and len(dd["test"]) == 12
    assert dd["train"].column_names == ["image", "label"]
    assert isinstance(dd["train"].features["label"], datasets.ClassLabel)
    assert dd["train"][0]["image"].size == (32, 32)
    single = load_image_dataset(str(tmp_path / "pq" / "train.parquet"), cache_dir=str(tmp_path / "cache"))
    assert set(single) == {"train"} and len(single["train"]) == 12


def test_column_and_split_errors(digits, tmp_path):
    _write_parquet_splits(digits, tmp_path / "pq", image="picture", label="target")
    source, cache = str(tmp_path / "pq"), str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"no image column.*'picture'.*image_column"):
        load_image_dataset(source, cache_dir=cache)
    with pytest.raises(ValueError, match=r"no label column.*'target'.*label_column"):
        load_image_dataset(source, image_column="picture", cache_dir=cache)
    dd = load_image_dataset(source, image_column="picture", label_column="target", cache_dir=cache)
    assert dd["train"].column_names == ["image", "label"]
    assert set(load_image_dataset(source, image_column="picture", label_column="target", test_split=None,
                                  cache_dir=cache)) == {"train"}
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['train', 'test'\]"):
        load_image_dataset(source, image_column="picture", label_column="target", test_split="validation",
                           cache_dir=cache)
    with pytest.raises(ValueError, match=r"split 'training' not found.*train_split"):
        load_image_dataset(source, train_split="training", cache_dir=cache)


def test_integer_and_non_integer_labels(tmp_path, digits):
    images = [digits["train"][i]["image"] for i in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 3, 1, 2]}).to_parquet(str(tmp_path / "ints.parquet"))
    dd = load_image_dataset(str(tmp_path / "ints.parquet"), cache_dir=str(tmp_path / "cache"))
    assert dd["train"].features["label"].names == ["0", "1", "2", "3"]
    # a value below the largest without any image: not class indices 0..C-1
    datasets.Dataset.from_dict({"image": images, "label": [0, 3, 1, 3]}).to_parquet(str(tmp_path / "gap.parquet"))
    with pytest.raises(ValueError, match=r"run up to 3, but 1 value\(s\) below that have no image in any split: \[2\]"):
        load_image_dataset(str(tmp_path / "gap.parquet"), cache_dir=str(tmp_path / "cache"))
    datasets.Dataset.from_dict({"image": images, "label": [1, 2, 2, 3]}).to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(ValueError, match=r"\[0\].*1-based: subtract 1"):
        load_image_dataset(str(tmp_path / "one.parquet"), cache_dir=str(tmp_path / "cache"))
    # strings: encoded like class_encode_column, names sorted
    datasets.Dataset.from_dict({"image": images, "label": ["b", "c", "b", "a"]}).to_parquet(
        str(tmp_path / "strings.parquet"))
    dd = load_image_dataset(str(tmp_path / "strings.parquet"), cache_dir=str(tmp_path / "cache"))
    assert dd["train"].features["label"].names == ["a", "b", "c"] and dd["train"]["label"][:] == [1, 2, 1, 0]
    datasets.Dataset.from_dict({"image": images, "label": [0, -1, 1, 2]}).to_parquet(str(tmp_path / "hidden.parquet"))
    with pytest.raises(ValueError, match=r"label\[1\] = -1 is negative.*without public labels"):
        load_image_dataset(str(tmp_path / "hidden.parquet"), cache_dir=str(tmp_path / "cache"))
    datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 1.0, 2.0]}).to_parquet(
        str(tmp_path / "floats.parquet"))
    with pytest.raises(ValueError, match=r"holds Value\('float64'\).*ClassLabel, integer class indices"):
        load_image_dataset(str(tmp_path / "floats.parquet"), cache_dir=str(tmp_path / "cache"))


def test_save_to_disk_folder(digits, tmp_path):
    small = datasets.DatasetDict({k: v.select(range(6)) for k, v in digits.items()})
    small.save_to_disk(str(tmp_path / "saved"))
    dd = load_image_dataset(str(tmp_path / "saved"))
    assert set(dd) == {"train", "val", "test"} and dd["train"]["label"][:] == small["train"]["label"][:]


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "imgs" / split / name).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (10, 10), (k, 0, 0)).save(tmp_path / "imgs" / split / name / f"{k}.png")
    dd = load_image_dataset(str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    assert len(dd["train"]) == len(dd["test"]) == 4
    assert dd["train"].features["label"].names == ["cat", "dog"]


def test_missing_paths_and_hub_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nothing" / "here"))
    with pytest.raises(FileNotFoundError, match="Hub dataset id"):  # offline: the Hub code path still runs
        load_image_dataset("someone-who-does-not-exist/no-such-dataset", cache_dir=str(tmp_path / "cache"))


def test_cifar10_loads_lazily(cifar10):
    assert cifar10["train"].features["label"].names[0] == "airplane"
    assert cifar10["train"][0]["image"].size == (32, 32)


# ---------------------------------------------------------------------------------------------------------------
# benchmark lists


def _fake_root(tmp_path, rel_paths):
    for i, rel in enumerate(rel_paths):
        path = tmp_path / "root" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (i * 20, 0, 0)).save(path)
    return tmp_path / "root"


def test_split_file_and_imagenet_lt(tmp_path):
    files = ["train/n01/a.png", "train/n01/b.png", "train/n02/c d.png", "val/n02/e.png", "val/n03/f.png"]
    root = _fake_root(tmp_path, files)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ImageNet_LT_train.txt").write_text(f"{files[0]} 0\n{files[1]} 0\n{files[2]} 1\ntrain/n02/missing.png 1\n")
    (lists / "ImageNet_LT_val.txt").write_text(f"{files[3]} 1\n\n{files[4]} 2\n")
    train = load_split_file(root, lists / "ImageNet_LT_train.txt", class_names=["tench", "goldfish", "shark"])
    assert len(train) == 4 and train["label"][:] == [0, 0, 1, 1]
    assert train.features["label"].names == ["tench", "goldfish", "shark"]
    assert train[2]["image"].size == (12, 10)  # a path with a space
    with pytest.raises(FileNotFoundError):  # a missing image fails only when it is read
        train[3]["image"]
    dd = load_benchmark("imagenet_lt", root, split_dir=lists)
    assert set(dd) == {"train", "val"}  # no test list: left out
    assert dd["train"].features["label"].num_classes == dd["val"].features["label"].num_classes == 3
    with pytest.raises(FileNotFoundError, match="ImageNet_LT_test.txt"):
        load_split_file(root, lists / "ImageNet_LT_test.txt")
    with pytest.raises(FileNotFoundError, match="ImageNet_LT_train.txt"):
        load_benchmark("imagenet_lt", root)  # lists are not in root
    (lists / "bad.txt").write_text("a.png 0\nb.png\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_split_file(root, lists / "bad.txt")
    with pytest.raises(ValueError, match="imagenet_lt, places_lt, inat2018"):
        load_benchmark("imagenet", root)


def test_places_lt(tmp_path):
    files = ["data_256/a/abbey/1.png", "data_256/b/bar/2.png", "test_256/3.png"]
    root = _fake_root(tmp_path, files)
    for split, lines in (("train", f"/{files[0]} 0\n/{files[1]} 1\n"), ("val", f"/{files[1]} 1\n"),
                         ("test", f"{files[2]} 0\n")):
        (root / f"Places_LT_{split}.txt").write_text(lines)
    dd = load_benchmark("places_lt", root)
    assert set(dd) == {"train", "val", "test"} and len(dd["train"]) == 2
    assert dd["test"][0]["image"].size == (12, 10)


def test_inaturalist(tmp_path):
    files = ["train_val2018/Plantae/5/x.png", "train_val2018/Aves/2/y.png", "train_val2018/Aves/2/z.png"]
    root = _fake_root(tmp_path, files)
    categories = [{"id": 2, "name": "Aves sp."}, {"id": 5, "name": "Plantae sp."}]
    train = {"images": [{"id": 10 + i, "file_name": f} for i, f in enumerate(files)],
             "annotations": [{"image_id": 10, "category_id": 5}, {"image_id": 11, "category_id": 2},
                             {"image_id": 12, "category_id": 2}],
             "categories": categories}
    (root / "train2018.json").write_text(json.dumps(train))
    val = {"images": [{"id": 1, "file_name": files[0]}], "annotations": [{"image_id": 1, "category_id": 5}]}
    (root / "val2018.json").write_text(json.dumps(val))
    ds = load_inaturalist(root, root / "train2018.json")
    assert ds["label"][:] == [1, 0, 0] and ds.features["label"].names == ["Aves sp.", "Plantae sp."]
    assert ds[0]["image"].size == (12, 10)
    no_categories = load_inaturalist(root, root / "val2018.json")
    assert no_categories["label"][:] == [5] and no_categories.features["label"].num_classes == 6
    dd = load_benchmark("inat2018", root)
    assert set(dd) == {"train", "val"} and len(dd["train"]) == 3
    with pytest.raises(FileNotFoundError, match="test2018.json"):
        load_inaturalist(root, root / "test2018.json")

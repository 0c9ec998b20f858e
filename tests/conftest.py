import os

# The Hub is unreachable from test machines: fail fast instead of retrying, before huggingface_hub loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
# the real CIFAR-10 parquet: ../shared/data/cifar10 next to the repository, or wherever NCL_HUB_CIFAR10_DIR says
CIFAR10_DIR = Path(os.environ.get("NCL_HUB_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "train.parquet").exists():
        pytest.skip(f"shared CIFAR-10 parquet not found at {CIFAR10_DIR} (set NCL_HUB_CIFAR10_DIR to its folder)")
    return CIFAR10_DIR


# a CPU-sized training command line for the recipe tests
TINY = ["--model.backbone", "resnet8_cifar_tiny", "--data.batch_size", "8", "--data.eval_batch_size", "16",
        "--data.num_workers", "0", "--data.val_per_class", "2", "--optim.warmup_steps", "0", "--log_every", "2"]


def make_tiny_dataset(path: Path, per_class=(12, 8, 5, 3), test_per_class=3, seed=0, corrupt_index=None,
                      columns=("image", "label")) -> Path:
    """A long-tailed 4-class image dataset written with save_to_disk (a DatasetDict folder).

    ``corrupt_index``: the train image at that index is replaced by bytes that are not an image.
    ``columns``: names of the image and label columns.
    """
    import datasets
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = ["red", "green", "blue", "gray", "dark", "light"][: len(per_class)]

    def rows(counts, corrupt=None):
        images, labels = [], []
        for c, n in enumerate(counts):
            for _ in range(n):
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 160 if c < 3 else 90
                noise = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(base + noise).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
                labels.append(c)
        if corrupt is not None:
            images[corrupt] = {"bytes": b"this is not an image", "path": None}
        return {columns[0]: images, columns[1]: labels}

    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(names=names)})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(per_class, corrupt_index), features=features),
        "test": datasets.Dataset.from_dict(rows([test_per_class] * len(per_class)), features=features),
    })
    dd.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def step_runner(model, accelerator, class_counts, **runner_kwargs):
    """A StepRunner over ``model`` with the NCL loss and the recipe's SGD settings (lr 0.05)."""
    from ncl_hub.losses import NCLLoss
    from ncl_hub.training import ModelWithLoss, StepRunner

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=2e-4)
    return StepRunner(accelerator, ModelWithLoss(model, NCLLoss(class_counts, validate_targets=False)), opt,
                      **runner_kwargs)


def lockstep(runners, *, seed, steps=3, batch=16, num_classes=6):
    """Feed every runner the same random batches and the same random anchor draws; yield each step's loss dicts."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, xk = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(num_classes, (batch,), generator=g)
        losses = []
        for runner in runners:
            torch.manual_seed(7)  # the same random anchor expert for every runner
            losses.append(runner(x, y, xk)[0])
        yield losses

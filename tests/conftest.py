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
CIFAR10_DIR = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "train.parquet").exists():
        pytest.skip(f"shared CIFAR-10 parquet not found at {CIFAR10_DIR}")
    return CIFAR10_DIR

"""Epoch samplers for long-tailed training: instance-balanced, class-balanced, square-root and progressive.

Every sampler draws indices over the FULL dataset and is a pure function of ``(seed, epoch)``: all processes
build the same sampler and get the same order, and Accelerate's ``BatchSamplerShard`` then gives each process
its own batches. Call ``set_epoch(epoch)`` before each epoch. Sampling is vectorised (``torch.randperm`` /
``torch.multinomial`` over classes, then a uniform pick within each drawn class), so iNaturalist's 437k labels
cost milliseconds.

Class-level samplers draw with replacement: an epoch is N draws, where class c is picked with probability
p_c(epoch) and then one of its n_c images uniformly. Classes with no images are never drawn.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Type, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from ..labels import as_label_array
from ..seeding import derive_seed
from .longtail import label_array

__all__ = [
    "SAMPLERS",
    "ClassBalancedSampler",
    "EpochSampler",
    "InstanceSampler",
    "ProgressiveSampler",
    "SqrtSampler",
    "build_sampler",
]

LabelsLike = Union[torch.Tensor, np.ndarray, Sequence[int], Any]


def _as_labels(labels: LabelsLike) -> torch.Tensor:
    if hasattr(labels, "column_names"):  # a datasets.Dataset: read its label column, no image decoding
        labels = label_array(labels)
    return torch.from_numpy(as_label_array(labels).copy())  # a copy: Arrow-backed arrays are read-only


class EpochSampler(Sampler[int]):
    """Base class: N indices per epoch [N = len(labels)], deterministic given ``(seed, epoch)``.

    Args:
        labels: class index of every sample [N] (a list, array, tensor or a ``datasets.Dataset``).
        num_classes: C (default: the largest label + 1).
        seed: base seed, shared by all processes.
    """

    name = "base"

    def __init__(self, labels: LabelsLike, *, num_classes: Optional[int] = None, seed: int = 0):
        self.labels = _as_labels(labels)
        max_label = int(self.labels.max()) + 1 if self.labels.numel() else 0
        self.num_classes = max_label if num_classes is None else int(num_classes)
        if self.num_classes < max_label:
            raise ValueError(f"num_classes={num_classes} but labels go up to {max_label - 1}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields next."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, self.epoch))
        return generator

    def indices(self) -> torch.Tensor:
        """The epoch's indices [N] (int64)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.labels.numel()

    def state_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("name", self.name) != self.name:
            raise ValueError(f"state_dict is for a {state_dict['name']!r} sampler, not {self.name!r}")
        self.seed = int(state_dict["seed"])
        self.set_epoch(int(state_dict["epoch"]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={len(self)}, num_classes={self.num_classes}, seed={self.seed})"


class InstanceSampler(EpochSampler):
    """Instance-balanced sampling: a random permutation of all N samples each epoch (every sample once)."""

    name = "instance"

    def indices(self) -> torch.Tensor:
        return torch.randperm(len(self), generator=self._generator())


class _ClassSampler(EpochSampler):
    """N draws with replacement: a class c with probability ``class_probabilities()[c]``, then a uniform image."""

    def __init__(self, labels: LabelsLike, *, num_classes: Optional[int] = None, seed: int = 0):
        super().__init__(labels, num_classes=num_classes, seed=seed)
        if not len(self):
            raise ValueError(f"{self.name!r} sampling needs at least one label")
        self.class_counts = torch.bincount(self.labels, minlength=self.num_classes)  # [C]
        self._by_class = torch.argsort(self.labels, stable=True)  # indices grouped by class [N]
        self._starts = torch.cumsum(self.class_counts, 0) - self.class_counts  # first position of each class [C]

    def class_probabilities(self) -> torch.Tensor:
        """p_c for the current epoch [C] (float64, sums to 1, 0 for classes without images)."""
        raise NotImplementedError

    def indices(self) -> torch.Tensor:
        generator = self._generator()
        n = len(self)
        classes = torch.multinomial(self.class_probabilities(), n, replacement=True, generator=generator)
        counts = self.class_counts[classes]
        offsets = (torch.rand(n, generator=generator, dtype=torch.float64) * counts).long()
        offsets = torch.minimum(offsets, counts - 1)
        return self._by_class[self._starts[classes] + offsets]

    def _normalise(self, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.where(self.class_counts > 0, weights, torch.zeros_like(weights))
        return weights / weights.sum()


class ClassBalancedSampler(_ClassSampler):
    """Class-balanced sampling (Kang et al. 2020): p_c = 1 / C over the classes that have images."""

    name = "class"

    def class_probabilities(self) -> torch.Tensor:
        return self._normalise(torch.ones(self.num_classes, dtype=torch.float64))


class SqrtSampler(_ClassSampler):
    """Square-root sampling (Mahajan et al. 2018, Kang et al. 2020): p_c proportional to n_c ** 0.5."""

    name = "sqrt"

    def class_probabilities(self) -> torch.Tensor:
        return self._normalise(self.class_counts.double().sqrt())


class ProgressiveSampler(_ClassSampler):
    """Progressively balanced sampling (Kang et al. 2020): p_c(t) = (1 - t/T) n_c / N + (t/T) / C.

    t is the epoch and T = ``num_epochs`` (t/T is clamped to 1); C counts the classes that have images.
    """

    name = "progressive"

    def __init__(self, labels: LabelsLike, *, num_epochs: int, num_classes: Optional[int] = None, seed: int = 0):
        super().__init__(labels, num_classes=num_classes, seed=seed)
        if num_epochs is None or num_epochs < 1:
            raise ValueError(f"progressive sampling needs num_epochs >= 1 (T in p_c(t)), got {num_epochs}")
        self.num_epochs = int(num_epochs)

    def class_probabilities(self) -> torch.Tensor:
        t = min(1.0, self.epoch / self.num_epochs)
        counts = self.class_counts.double()
        instance = counts / counts.sum()
        balanced = self._normalise(torch.ones_like(counts))
        return (1.0 - t) * instance + t * balanced


SAMPLERS: Dict[str, Type[EpochSampler]] = {
    "instance": InstanceSampler,
    "class": ClassBalancedSampler,
    "sqrt": SqrtSampler,
    "progressive": ProgressiveSampler,
}


def build_sampler(
        name: str,
        labels: LabelsLike,
        *,
        num_classes: Optional[int] = None,
        seed: int = 0,
        num_epochs: Optional[int] = None,
) -> EpochSampler:
    """Build a sampler by name.

    Args:
        name: ``"instance"`` (a permutation per epoch), ``"class"`` (class-balanced), ``"sqrt"`` (p_c ~ sqrt(n_c))
            or ``"progressive"`` (instance-balanced to class-balanced over ``num_epochs``).
        labels: class index of every training sample [N] (list, array, tensor or ``datasets.Dataset``).
        num_classes: C (default: the largest label + 1).
        seed: base seed; the order of an epoch depends on (seed, epoch) only.
        num_epochs: T, required by ``"progressive"``.

    Returns:
        An ``EpochSampler`` of length N; call ``set_epoch(epoch)`` before each epoch.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    if name == "progressive":
        if num_epochs is None:
            raise ValueError("the 'progressive' sampler needs num_epochs (T in p_c(t) = (1 - t/T) n_c/N + t/(T C))")
        return ProgressiveSampler(labels, num_classes=num_classes, seed=seed, num_epochs=num_epochs)
    return SAMPLERS[name](labels, num_classes=num_classes, seed=seed)

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from ncl_hub.data import long_tailed_counts
from ncl_hub.data.samplers import SAMPLERS, build_sampler

NAMES = list(SAMPLERS)
NUM_CLASSES = 10
NUM_EPOCHS = 10


@pytest.fixture(scope="module")
def lt_labels() -> torch.Tensor:
    """A shuffled long-tailed label list of about 50k samples (IF 100, head 20,000)."""
    counts = long_tailed_counts(20000, NUM_CLASSES, 100)
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    return torch.from_numpy(np.random.default_rng(0).permutation(labels))


def _build(name, labels, **kw):
    return build_sampler(name, labels, num_classes=NUM_CLASSES, num_epochs=NUM_EPOCHS, **kw)


def _expected_probs(name: str, counts: np.ndarray, epoch: int) -> np.ndarray:
    c = len(counts)
    if name == "instance":
        return counts / counts.sum()
    if name == "class":
        return np.full(c, 1.0 / c)
    if name == "sqrt":
        return np.sqrt(counts) / np.sqrt(counts).sum()
    t = epoch / NUM_EPOCHS
    return (1 - t) * counts / counts.sum() + t / c


def _chi_square(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("name,epoch", [("instance", 0), ("class", 0), ("sqrt", 0),
                                        ("progressive", 0), ("progressive", 5), ("progressive", 10)])
def test_class_frequencies_match_specification(lt_labels, name, epoch):
    sampler = _build(name, lt_labels, seed=1)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler))
    assert len(idx) == len(sampler) == len(lt_labels)
    counts = np.bincount(lt_labels.numpy(), minlength=NUM_CLASSES)
    observed = np.bincount(lt_labels[idx].numpy(), minlength=NUM_CLASSES)
    probs = _expected_probs(name, counts, epoch)
    # 9 degrees of freedom: P(chi2 > 40) ~ 7e-6; the seed is fixed, so this is deterministic anyway
    assert _chi_square(observed, probs) < 40, (observed, probs * observed.sum())
    if name != "instance":
        assert np.allclose(sampler.class_probabilities().numpy(), probs)


def test_instance_sampler_is_a_permutation(lt_labels):
    idx = list(_build("instance", lt_labels))
    assert sorted(idx) == list(range(len(lt_labels)))


@pytest.mark.parametrize("name", ["class", "sqrt", "progressive"])
def test_uniform_within_class(lt_labels, name):
    sampler = _build(name, lt_labels)
    sampler.set_epoch(NUM_EPOCHS)  # the progressive sampler is class-balanced at t = T
    idx = sampler.indices()
    tail = NUM_CLASSES - 1
    members = torch.nonzero(lt_labels == tail).flatten()
    drawn = idx[lt_labels[idx] == tail]
    hits = torch.bincount(torch.searchsorted(members, drawn), minlength=len(members)).numpy()
    assert set(drawn.tolist()) <= set(members.tolist())
    assert _chi_square(hits, np.full(len(members), 1.0 / len(members))) < len(members) + 6 * np.sqrt(2 * len(members))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed_and_epoch(lt_labels, name):
    a, b = _build(name, lt_labels, seed=3), _build(name, lt_labels, seed=3)
    for sampler in (a, b):
        sampler.set_epoch(2)
    assert list(a) == list(b)
    order2 = list(a)
    a.set_epoch(3)
    assert list(a) != order2
    assert list(_build(name, lt_labels, seed=4)) != list(_build(name, lt_labels, seed=3))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(lt_labels, name):
    sampler = _build(name, lt_labels, seed=7)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    resumed = _build(name, lt_labels, seed=0)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4 and resumed.seed == 7
    assert list(resumed) == list(sampler)
    other = "class" if name != "class" else "sqrt"
    with pytest.raises(ValueError, match="sampler"):
        _build(other, lt_labels).load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_two_process_shards_are_disjoint_and_cover_the_epoch(name):
    labels = torch.from_numpy(np.repeat(np.arange(5), [400, 250, 200, 100, 50]))  # N = 1000
    batch_size = 10
    full = list(BatchSampler(_build(name, labels, seed=5), batch_size, drop_last=False))
    shards = []
    for rank in range(2):
        sampler = _build(name, labels, seed=5)  # each process builds its own
        sampler.set_epoch(0)
        shards.append(list(BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False),
                                             num_processes=2, process_index=rank, even_batches=True)))
    assert len(shards[0]) == len(shards[1]) == len(full) // 2
    # process i gets batches i, i + 2, ...: disjoint positions whose union is the epoch's batch list
    assert shards[0] == full[0::2] and shards[1] == full[1::2]
    assert sorted(map(tuple, shards[0] + shards[1])) == sorted(map(tuple, full))
    if name == "instance":
        assert not set(sum(shards[0], [])) & set(sum(shards[1], []))


def test_build_errors():
    with pytest.raises(ValueError, match="instance, class, sqrt, progressive"):
        build_sampler("balanced", [0, 1])
    with pytest.raises(ValueError, match="num_epochs"):
        build_sampler("progressive", [0, 1])
    with pytest.raises(ValueError, match="integer"):
        build_sampler("instance", [0.5, 1.0])
    with pytest.raises(ValueError, match="num_classes"):
        build_sampler("class", [0, 5], num_classes=3)


def test_empty_classes_are_never_drawn():
    labels = torch.tensor([0] * 50 + [2] * 5)  # class 1 has no images
    for name in ("class", "sqrt", "progressive"):
        sampler = build_sampler(name, labels, num_classes=3, num_epochs=2)
        sampler.set_epoch(2)
        assert 1 not in set(labels[sampler.indices()].tolist())


def test_inaturalist_sized_list_is_fast():
    import time
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 8142, 437_513))
    start = time.perf_counter()
    sampler = build_sampler("class", labels, num_classes=8142)
    idx = list(sampler)
    assert len(idx) == 437_513
    assert time.perf_counter() - start < 10  # vectorised: well under a second on one core

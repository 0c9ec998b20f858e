"""Deploying under an unknown class prior: BCTS calibration (ncl_hub.calibration) and EM label-shift estimation
(ncl_hub.priors.estimate_prior / select_shrinkage), on synthetic logits whose true posteriors are known in closed
form, and against naive per-sample loops of the papers' equations."""
import json
import math

import pytest
import torch

from ncl_hub.calibration import Calibration, expected_calibration_error, fit_bcts, nll
from ncl_hub.priors import PriorEstimate, estimate_prior, long_tailed_prior, select_shrinkage

C = 10
UNIFORM = torch.full((C,), 1 / C, dtype=torch.float64)
SHIFT = torch.linspace(-2, 2, C, dtype=torch.float64)  # the per-class miscalibration of the BCTS tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tensors here are small: on a busy machine extra threads only add synchronisation overhead
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_logits(counts, seed: int, scale: float = 3.0):
    """Exactly calibrated balanced-prior logits and their labels, ``counts[c]`` samples of class c.

    x ~ N(scale * e_y, I) in C dimensions, so ``log p(x|c) = scale * x_c + const(x)`` and the posterior under a
    uniform prior is ``softmax(scale * x)``: the logits ``z = scale * x`` are the exact balanced posteriors.
    Fixed counts (not sampled ones) make the sample's class frequencies exactly ``counts / sum(counts)``.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(counts)).repeat_interleave(torch.as_tensor(counts))
    x = scale * torch.nn.functional.one_hot(labels, len(counts)).double()
    x = x + torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return scale * x, labels


def stratified(prior: torch.Tensor, n: int):
    counts = (prior * n).round().long()
    return counts, counts.double() / counts.sum()


def naive_em(logits: torch.Tensor, source_prior: torch.Tensor, shrinkage: float, steps: int) -> torch.Tensor:
    """Saerens et al.'s EM written out sample by sample (with the Dirichlet pseudo-count of the M-step)."""
    p_s = torch.softmax(logits, dim=1).tolist()
    n, c = logits.shape
    pi = [1.0 / c] * c
    for _ in range(steps):
        totals = [0.0] * c
        for row in p_s:
            joint = [row[k] * pi[k] / source_prior[k].item() for k in range(c)]
            for k in range(c):
                totals[k] += joint[k] / sum(joint)
        pi = [(totals[k] + shrinkage) / (n + c * shrinkage) for k in range(c)]
    return torch.tensor(pi, dtype=torch.float64)


# -------------------------------------------------------------------------------------------------- EM
@pytest.mark.parametrize("imbalance", [10.0, 1 / 25])
def test_em_recovers_a_known_prior(imbalance):
    target = long_tailed_prior([1] * C, imbalance)
    counts, frequencies = stratified(target, 5000)
    logits, _ = gaussian_logits(counts, seed=1)
    est = estimate_prior(logits)
    assert isinstance(est, PriorEstimate) and est.prior.dtype == torch.float64 and est.prior.shape == (C,)
    assert est.prior.sum().item() == pytest.approx(1.0)
    assert (est.prior - frequencies).abs().sum().item() < 0.02
    assert (est.prior - target).abs().sum().item() < 0.02
    assert est.converged and 1 <= est.iterations < 1000
    assert est.num_samples == int(counts.sum()) and est.shrinkage == 0.0
    # EM starts at the source prior (log-likelihood ratio 0) and only climbs; a skewed sample is worth fewer
    assert est.log_likelihood > 0.05
    assert 0 < est.effective_sample_size < 0.95 * est.num_samples
    assert json.loads(json.dumps(est.to_dict()))["prior"] == pytest.approx(est.prior.tolist())


def test_em_on_a_uniform_sample_returns_the_uniform_prior():
    logits, _ = gaussian_logits([500] * C, seed=2)
    est = estimate_prior(logits)
    assert (est.prior - UNIFORM).abs().sum().item() < 0.02
    assert est.converged
    assert 0 <= est.log_likelihood < 1e-3
    assert est.effective_sample_size > 0.99 * est.num_samples


def test_em_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(40, 4, generator=generator, dtype=torch.float64)
    source = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    for shrinkage in (0.0, 0.3):  # kappa 0.3 of 40 samples over 4 classes: 3 pseudo-counts per class
        est = estimate_prior(logits, source_prior=source, shrinkage=shrinkage, max_iter=7, tol=1e-15)
        assert est.iterations == 7 and not est.converged
        assert est.prior.tolist() == pytest.approx(naive_em(logits, source, shrinkage * 40 / 4, 7).tolist(),
                                                   abs=1e-12)
        weights = torch.tensor([sum(p * q / s for p, q, s in zip(row, est.prior.tolist(), source.tolist()))
                                for row in torch.softmax(logits, 1).tolist()], dtype=torch.float64)
        assert est.log_likelihood == pytest.approx(weights.log().mean().item(), abs=1e-12)
        assert est.effective_sample_size == pytest.approx((weights.sum() ** 2 / weights.square().sum()).item())


def test_shrinkage_pulls_towards_uniform():
    counts, _ = stratified(long_tailed_prior([1] * C, 25.0), 2000)
    logits, _ = gaussian_logits(counts, seed=4)
    distances = [(estimate_prior(logits, shrinkage=a).prior - UNIFORM).abs().sum().item()
                 for a in (0.0, 0.01, 0.1, 1.0, 100.0)]
    assert all(d1 > d2 for d1, d2 in zip(distances, distances[1:]))
    assert distances[-1] < 0.01


def test_em_with_a_non_uniform_source_prior_keeps_its_zeros():
    source = long_tailed_prior([1] * C, 5.0)
    source[3] = 0
    source = source / source.sum()
    target = long_tailed_prior([1] * C, 1 / 5)
    target[3] = 0
    counts, frequencies = stratified(target / target.sum(), 5000)
    balanced, _ = gaussian_logits(counts, seed=5)
    logits = balanced + torch.where(source > 0, source.log(), torch.zeros_like(source))  # posteriors under source
    est = estimate_prior(logits, source_prior=source.tolist())
    assert est.prior[3].item() == 0.0
    assert (est.prior - frequencies).abs().sum().item() < 0.02
    assert est.converged


def test_em_stops_at_max_iter():
    counts, _ = stratified(long_tailed_prior([1] * C, 50.0), 1000)
    logits, _ = gaussian_logits(counts, seed=6)
    est = estimate_prior(logits, max_iter=1)
    assert est.iterations == 1 and not est.converged
    assert est.prior.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("logits, kwargs, match", [
    (torch.zeros(5), {}, "shape"),
    (torch.zeros(0, 3), {}, "empty"),
    (torch.tensor([[0.0, float("nan")]]), {}, "non-finite"),
    (torch.zeros(4, 3, dtype=torch.long), {}, "floating-point"),
    (torch.zeros(4, 3), {"shrinkage": -1.0}, "shrinkage"),
    (torch.zeros(4, 3), {"shrinkage": float("inf")}, "shrinkage"),
    (torch.zeros(4, 3), {"tol": 0.0}, "tol"),
    (torch.zeros(4, 3), {"max_iter": 0}, "max_iter"),
    (torch.zeros(4, 3), {"source_prior": [0.5, 0.5]}, "source_prior"),
    (torch.zeros(4, 3), {"source_prior": [0.5, -0.5, 1.0]}, "negative"),
])
def test_estimate_prior_rejects_invalid_input(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_prior(logits, **kwargs)


# ----------------------------------------------------------------------------------------- shrinkage choice
def test_select_shrinkage_is_deterministic_and_returns_a_candidate():
    logits, labels = gaussian_logits([500] * C, seed=7)
    candidates = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    best, table = select_shrinkage(logits, labels, candidates=candidates, seed=0)
    assert best in candidates and list(table) == list(candidates)
    assert all(0 <= v <= 2 for v in table.values()) and table[best] == min(table.values())
    assert select_shrinkage(logits, labels, candidates=candidates, seed=0) == (best, table)
    # heavy shrinkage is wrong on strongly shifted priors
    assert table[1.0] > table[0.0]


def test_select_shrinkage_with_an_absent_class_and_a_training_order():
    logits, labels = gaussian_logits([0] + [100] * (C - 1), seed=8)
    best, table = select_shrinkage(logits, labels, candidates=(0.0, 0.1), sample_sizes=(200,), draws=2,
                                   imbalances=(10.0, 0.1), class_order_counts=list(range(C, 0, -1)))
    assert best in (0.0, 0.1) and all(math.isfinite(v) for v in table.values())


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": ()}, "candidates"), ({"candidates": (0.0, -1.0)}, "candidate"),
    ({"candidates": (1.0, 1.0)}, "repeated"), ({"sample_sizes": (0,)}, "sample size"), ({"draws": 0}, "draws"),
    ({"class_order_counts": [1, 2]}, "class_order_counts"), ({"imbalances": ()}, "imbalance"),
    ({"imbalances": (0.0,)}, "imbalance"), ({"seed": 0.5}, "seed"),
])
def test_select_shrinkage_rejects_invalid_settings(kwargs, match):
    logits, labels = gaussian_logits([5] * C, seed=9)
    with pytest.raises(ValueError, match=match):
        select_shrinkage(logits, labels, **kwargs)


# --------------------------------------------------------------------------------------------------- BCTS
@pytest.fixture(scope="module")
def miscalibrated():
    """A long-tailed fit split and a balanced held-out split of logits ``3 z + SHIFT`` (z exactly calibrated)."""
    counts, _ = stratified(long_tailed_prior([1] * C, 10.0), 10000)
    fit_z, fit_y = gaussian_logits(counts, seed=10)
    test_z, test_y = gaussian_logits([500] * C, seed=11)
    return 3 * fit_z + SHIFT, fit_y, 3 * test_z + SHIFT, test_y


def test_bcts_undoes_a_known_miscalibration(miscalibrated):
    fit_z, fit_y, test_z, test_y = miscalibrated
    cal = fit_bcts(fit_z, fit_y)
    assert cal.temperature == pytest.approx(3.0, rel=0.05)
    expected = -SHIFT / 3  # centred already; the fit split's own long-tailed prior must not leak into b
    assert max(abs(b - e) for b, e in zip(cal.bias, expected.tolist())) < 0.3
    assert sum(cal.bias) == pytest.approx(0.0, abs=1e-9)
    assert cal.fitted_on == 10000 and cal.nll_after < cal.nll_before
    calibrated = cal.apply(test_z)
    assert nll(calibrated, test_y) < 0.7 * nll(test_z, test_y)
    assert expected_calibration_error(calibrated, test_y) < 0.5 * expected_calibration_error(test_z, test_y)
    # plain temperature scaling: no bias, and worse than BCTS on a class-wise miscalibration
    ts = fit_bcts(fit_z, fit_y, bias=False)
    assert ts.bias == [0.0] * C and ts.temperature > 1
    assert nll(calibrated, test_y) < nll(ts.apply(test_z), test_y)


def test_bcts_then_em_recovers_the_test_prior():
    # under-confident and class-biased logits: EM on them is far off; after BCTS (fitted on a differently
    # long-tailed split) it recovers the test prior
    def miscalibrate(z):
        return 0.5 * z + SHIFT

    fit_counts, _ = stratified(long_tailed_prior([1] * C, 10.0), 5000)
    fit_z, fit_y = gaussian_logits(fit_counts, seed=12)
    counts, frequencies = stratified(long_tailed_prior([1] * C, 1 / 10), 5000)
    test_z, _ = gaussian_logits(counts, seed=13)
    cal = fit_bcts(miscalibrate(fit_z), fit_y)
    raw_error = (estimate_prior(miscalibrate(test_z)).prior - frequencies).abs().sum().item()
    error = (estimate_prior(cal.apply(miscalibrate(test_z))).prior - frequencies).abs().sum().item()
    assert error < 0.05 and error < 0.25 * raw_error


def test_bcts_with_a_class_missing_from_the_fit_split():
    fit_z, fit_y = gaussian_logits([0, 300, 200, 150, 100, 80, 60, 40, 30, 20], seed=14)
    cal = fit_bcts(3 * fit_z + SHIFT, fit_y)
    assert cal.bias[0] == 0.0
    assert all(math.isfinite(v) for v in [cal.temperature, cal.nll_before, cal.nll_after, *cal.bias])
    assert sum(cal.bias[1:]) == pytest.approx(0.0, abs=1e-9)
    test_z, test_y = gaussian_logits([50] * C, seed=15)
    out = cal.apply(3 * test_z + SHIFT)
    assert torch.isfinite(out).all() and math.isfinite(nll(out, test_y))
    # the same through an explicit fit prior with a 0 for the absent class
    prior = torch.bincount(fit_y, minlength=C).tolist()
    assert fit_bcts(3 * fit_z + SHIFT, fit_y, fit_prior=prior).bias == pytest.approx(cal.bias, abs=1e-9)


def test_apply_dtypes_and_shapes():
    cal = Calibration(temperature=2.0, bias=[0.5, -0.5, 0.0])
    z = torch.tensor([[2.0, 4.0, -2.0]])
    assert cal.apply(z).tolist() == [[1.5, 1.5, -1.0]]
    assert cal.apply(z.bfloat16()).dtype == torch.float32 and cal.apply(z.half()).dtype == torch.float32
    assert cal.apply(z.double()).dtype == torch.float64
    assert cal.apply(torch.zeros(2, 5, 3)).shape == (2, 5, 3)
    assert torch.equal(Calibration.identity(3).apply(z), z)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        cal.apply(torch.zeros(2, 4))


def test_to_dict_from_dict_round_trip():
    fit_z, fit_y = gaussian_logits([40] * 4, seed=16)
    cal = fit_bcts(2 * fit_z, fit_y)
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), num_classes=4)
    assert again == cal
    assert Calibration.from_dict(Calibration.identity(4).to_dict()) == Calibration.identity(4)


@pytest.mark.parametrize("change, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": "2"}, "temperature"),
    ({"bias": [0.0, float("inf"), 0.0]}, "bias"), ({"bias": []}, "bias"), ({"fitted_on": -1}, "fitted_on"),
    ({"nll_after": float("nan")}, "nll_after"), ({"temprature": 1.0}, "unknown keys"),
    ({"bias": [0.0, 0.0]}, "bias has 2 entries"),
])
def test_from_dict_rejects_invalid_fields(change, match):
    data = {**Calibration(temperature=1.5, bias=[0.1, -0.1, 0.0]).to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(data, num_classes=3)


def test_from_dict_needs_temperature_and_bias():
    with pytest.raises(ValueError, match="missing keys"):
        Calibration.from_dict({"bias": [0.0]})


@pytest.mark.parametrize("labels, kwargs, match", [
    ([0, 1, 5], {}, "outside"), ([0, 1], {}, "3 samples"), ([[0, 1, 2]], {}, "1-d"), ([0.0, 1.0, 2.0], {}, "integer"),
    ([0, 1, 2], {"fit_prior": [1, 1, 0]}, "fit_prior is 0"), ([0, 1, 2], {"l2": -1.0}, "l2"),
    ([0, 1, 2], {"max_iter": 0}, "max_iter"),
])
def test_fit_bcts_rejects_invalid_input(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_bcts(torch.randn(3, 3), labels, **kwargs)


def test_nll_and_ece_against_naive_loops():
    generator = torch.Generator().manual_seed(17)
    logits = 3 * torch.randn(200, 5, generator=generator)
    labels = torch.randint(0, 5, (200,), generator=generator)
    probs = torch.softmax(logits.double(), 1)
    assert nll(logits, labels) == pytest.approx(-sum(math.log(probs[i, y]) for i, y in enumerate(labels.tolist()))
                                                / 200)
    num_bins = 10
    bins = [[] for _ in range(num_bins)]
    for row, y in zip(probs.tolist(), labels.tolist()):
        conf = max(row)
        k = min(num_bins - 1, math.ceil(conf * num_bins) - 1)  # bins (lo, hi]
        bins[k].append((row.index(conf) == y, conf))
    naive = sum(abs(sum(c for c, _ in b) - sum(p for _, p in b)) for b in bins) / 200
    ece = expected_calibration_error(logits, labels, num_bins=num_bins)
    assert ece == pytest.approx(naive) and 0 <= ece <= 1
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(logits, labels, num_bins=0)

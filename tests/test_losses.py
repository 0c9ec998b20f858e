"""Each NCL loss against a naive, loop-by-loop implementation of the paper's equations (and of the
released code for the "official" variant), in float64."""
import math

import pytest
import torch

from ncl_hub.losses import (
    NCLLoss, balanced_logits, hard_category_mask, moco_loss, nbod_loss, ncl_loss, nil_loss,
)


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [x / s for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def naive_ncl(logits, target, counts, hard_ratio, distill_weight, anchor, variant):
    """Loops over samples, experts and expert pairs; plain Python floats."""
    K, B, C = logits.shape
    z = logits.double().tolist()
    logn = [math.log(c) for c in counts]
    k_hard = round(hard_ratio * C)
    terms = dict(nil_all=0.0, nil_hard=0.0, nbod_all=0.0, nbod_hard=0.0)
    for b in range(B):
        y = int(target[b])
        a = 0 if variant == "official" else anchor
        if variant == "paper":
            negatives = sorted((j for j in range(C) if j != y), key=lambda j: -z[a][b][j])[:k_hard]
            psi = sorted(set(negatives) | {y})
        else:
            order = [y] + sorted((j for j in range(C) if j != y), key=lambda j: -z[a][b][j])
            psi = sorted(order[:k_hard])
        p_all, p_hard = [], []
        for k in range(K):
            zb = [z[k][b][j] + logn[j] for j in range(C)]
            p = _softmax(zb)
            if variant == "paper":
                ph_psi = _softmax([zb[j] for j in psi])
                ph = [0.0] * C
                for j, v in zip(psi, ph_psi):
                    ph[j] = v
            else:
                ph = _softmax([zb[j] if j in psi else 0.0 for j in range(C)])
            terms["nil_all"] += -math.log(p[y]) / B
            terms["nil_hard"] += -math.log(ph[y]) / B
            p_all.append(p)
            p_hard.append(ph)
        norm = K * (K - 1) if variant == "paper" else (K - 1)
        for k in range(K):
            for q in range(K):
                if k != q:
                    terms["nbod_all"] += _kl(p_all[k], p_all[q]) / B / norm
                    terms["nbod_hard"] += _kl(p_hard[k], p_hard[q]) / B / norm
    terms["loss"] = terms["nil_all"] + terms["nil_hard"] + distill_weight * (terms["nbod_all"] + terms["nbod_hard"])
    return terms


CASES = [  # K, B, C, anchor
    (1, 4, 5, 0),
    (2, 6, 10, 1),
    (3, 8, 10, 2),
    (3, 5, 23, 0),
    (4, 3, 100, 3),
]


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("K,B,C,anchor", CASES)
def test_ncl_loss_matches_naive_equations(K, B, C, anchor, variant):
    g = torch.Generator().manual_seed(1000 * K + 10 * C + B)
    logits = torch.randn(K, B, C, generator=g) * 3
    target = torch.randint(C, (B,), generator=g)
    counts = torch.randint(1, 500, (C,), generator=g).tolist()
    out = ncl_loss(logits, target, counts, hard_ratio=0.3, distill_weight=0.6, anchor=anchor, variant=variant)
    ref = naive_ncl(logits, target, counts, 0.3, 0.6, anchor, variant)
    for key, value in ref.items():
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(value, rel=2e-5, abs=2e-5), key
    if K == 1:
        assert out["nbod_all"].item() == 0 and out["nbod_hard"].item() == 0


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_gradients_reach_every_expert(variant):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 8, 12, generator=g) * 2).requires_grad_()
    target = torch.randint(12, (8,), generator=g)
    ncl_loss(logits, target, list(range(1, 13)), anchor=1, variant=variant)["loss"].backward()
    per_expert = logits.grad.abs().sum(dim=(1, 2))
    assert torch.all(per_expert > 0)
    assert torch.isfinite(logits.grad).all()


def test_distillation_gradient_flows_to_both_sides_of_kl():
    # only NBOD terms: with nil removed, expert 1's gradient must come from being a teacher too
    logits = torch.randn(2, 4, 6).requires_grad_()
    logp = logits.log_softmax(-1)
    nbod_loss(logp).backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() > 0


def test_hard_category_mask_sizes_and_anchor():
    logits = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]],
                           [[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]])
    target = torch.tensor([9])
    paper0 = hard_category_mask(logits, target, 0.3, anchor=0, variant="paper")
    assert paper0[0].nonzero().flatten().tolist() == [0, 1, 2, 9]  # 3 negatives + ground truth
    paper1 = hard_category_mask(logits, target, 0.3, anchor=1, variant="paper")
    assert paper1[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    official = hard_category_mask(logits, target, 0.3, anchor=0, variant="official")
    assert official[0].nonzero().flatten().tolist() == [0, 1, 9]  # 3 classes in total, target forced in


def test_random_anchor_is_one_of_the_experts():
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 20)
    target = torch.randint(20, (16,))
    masks = {k: hard_category_mask(logits, target, 0.3, anchor=k) for k in range(3)}
    seen = set()
    for _ in range(30):
        m = hard_category_mask(logits, target, 0.3, anchor=None)
        match = [k for k, mk in masks.items() if torch.equal(m, mk)]
        assert match
        seen.update(match)
    assert len(seen) == 3


def test_moco_loss_matches_naive():
    g = torch.Generator().manual_seed(3)
    K, B, N, D = 2, 4, 7, 5
    q = torch.nn.functional.normalize(torch.randn(K, B, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(K, B, D, generator=g), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(K, N, D, generator=g), dim=-1)
    t = 0.2
    ref = 0.0
    for e in range(K):
        for b in range(B):
            pos = math.exp(float(q[e, b] @ k[e, b]) / t)
            neg = sum(math.exp(float(q[e, b] @ queue[e, j]) / t) for j in range(N))
            ref += -math.log(pos / (pos + neg)) / B
    assert moco_loss(q, k, queue, t).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_are_float32_under_autocast(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 8, 10, generator=g) * 4).to(dtype)
    target = torch.randint(10, (8,), generator=g)
    counts = [500, 300, 200, 100, 60, 30, 20, 10, 5, 2]
    ref = ncl_loss(logits.float(), target, counts, anchor=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ncl_loss(logits, target, counts, anchor=0)
        q = torch.nn.functional.normalize(torch.randn(3, 8, 16, generator=g), dim=-1)
        queue = torch.nn.functional.normalize(torch.randn(3, 32, 16, generator=g), dim=-1)
        con = moco_loss(q.to(dtype), q.to(dtype), queue)
    for key in ref:
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-6)
    con_ref = moco_loss(q.to(dtype).float(), q.to(dtype).float(), queue)
    assert con.dtype == torch.float32
    assert con.item() == pytest.approx(con_ref.item(), rel=1e-6)


def test_balanced_logits_and_nil_are_balanced_softmax_ce():
    logits = torch.randn(2, 5, 4)
    counts = torch.tensor([100.0, 10.0, 5.0, 1.0])
    target = torch.tensor([0, 1, 2, 3, 0])
    zb = balanced_logits(logits, counts.log())
    ref = sum(torch.nn.functional.cross_entropy(logits[k] + counts.log(), target) for k in range(2))
    assert nil_loss(zb.log_softmax(-1), target).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bad_counts_and_targets_name_the_class():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="class 2 has 0"):
        ncl_loss(logits, torch.tensor([0, 1, 2]), [5, 4, 0, 1])
    with pytest.raises(ValueError, match="class 0 has -1"):
        NCLLoss([-1, 4, 3, 1])
    loss = NCLLoss([5, 4, 3, 1])
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is outside \[0, 4\)"):
        loss(logits, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="hard_ratio"):
        NCLLoss([5, 4, 3, 1], hard_ratio=1.5)
    with pytest.raises(ValueError, match="variant"):
        ncl_loss(logits, torch.tensor([0, 1, 2]), [5, 4, 3, 1], variant="nope")


def test_module_matches_function_and_adds_contrastive_term():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 6, 10, generator=g)
    target = torch.randint(10, (6,), generator=g)
    counts = list(range(10, 0, -1))
    module = NCLLoss(counts, anchor=2, contrastive_weight=0.5)
    out = module(logits, target)
    ref = ncl_loss(logits, target, counts, anchor=2)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    q = torch.nn.functional.normalize(torch.randn(3, 6, 8, generator=g), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(3, 20, 8, generator=g), dim=-1)
    out2 = module(logits, target, q, q, queue)
    assert out2["loss"].item() == pytest.approx(ref["loss"].item() + 0.5 * out2["con"].item(), rel=1e-6)
    assert "log_prior" not in module.state_dict()  # derived from counts, not a checkpoint entry

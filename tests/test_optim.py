"""The optimizer of a run: timm's create_optimizer_v2, whose default must stay the released NCL's SGD (Nesterov
momentum 0.9, weight decay on every parameter, biases and normalisation layers included)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ncl_hub
from ncl_hub.baselines import ExpertCELoss, expert_ce_loss
from ncl_hub.config import ConfigError, RunConfig, apply_overrides, check_config
from ncl_hub.training import build_optimizer


def _model():
    torch.manual_seed(0)
    return ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=2)


def _steps(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(4, (6,), generator=gen)
        loss = F.cross_entropy(model.forward_experts(x).flatten(0, 1), y.repeat(model.num_experts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_default_is_nesterov_sgd_with_weight_decay_on_every_parameter():
    cfg = RunConfig()
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model)
    wd = cfg.optim.weight_decay
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == wd for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}  # biases and BatchNorm weights too
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == cfg.optim.lr for g in optimizer.param_groups)
    assert type(optimizer) is torch.optim.SGD
    # the same trajectory as the released code's torch.optim.SGD over all parameters
    released = torch.optim.SGD(reference.parameters(), lr=cfg.optim.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.optim.weight_decay)
    _steps(model, optimizer)
    _steps(reference, released)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_frozen_trunks_and_timm_options():
    model = ncl_hub.hub.freeze_trunks(_model())
    heads = {id(p) for p in model.heads.parameters()}
    optimizer = build_optimizer(RunConfig(), model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == heads
    filtered = build_optimizer(apply_overrides(RunConfig(), {"optim.filter_bias_and_bn": "true"}), _model())
    no_decay = [p for g in filtered.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_decay and all(p.ndim <= 1 for p in no_decay)
    plain = build_optimizer(apply_overrides(RunConfig(), {"optim.nesterov": "false"}), _model())
    assert not any(g["nesterov"] for g in plain.param_groups)
    adamw = build_optimizer(apply_overrides(RunConfig(), {"optim.name": "adamw", "optim.lr": "1e-3"}), _model())
    assert type(adamw).__name__ == "AdamW"
    layered = build_optimizer(apply_overrides(RunConfig(), {"optim.layer_decay": "0.5"}), _model())
    assert len({g["lr_scale"] for g in layered.param_groups}) > 1
    with pytest.raises(ConfigError, match="optim.name 'sgdd' is not a timm optimizer.*sgd"):
        check_config(apply_overrides(RunConfig(), {"optim.name": "sgdd"}))


def test_expert_ce_loss_matches_a_loop_over_experts():
    torch.manual_seed(0)
    logits, target, counts = torch.randn(3, 8, 5), torch.randint(5, (8,)), [40, 20, 10, 5, 2]
    log_prior = torch.tensor(counts, dtype=torch.float32).log()
    plain = sum(F.cross_entropy(logits[k], target) for k in range(3))
    balanced = sum(F.cross_entropy(logits[k] + log_prior, target) for k in range(3))
    assert torch.allclose(expert_ce_loss(logits, target), plain)
    assert torch.allclose(expert_ce_loss(logits, target, log_prior), balanced)
    assert torch.allclose(ExpertCELoss(counts, balanced=True)(logits, target)["loss"], balanced)
    assert torch.allclose(ExpertCELoss(counts, balanced=False)(logits, target)["ce"], plain)

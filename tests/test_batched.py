"""Batched expert execution (the K experts as one vmapped computation) equals the sequential path (CPU, fp32)."""
import copy

import pytest
import torch

import ncl_hub
from ncl_hub.config import ConfigError, RunConfig
from ncl_hub.models.batched import run_stacked
from ncl_hub.training import build_model

MOCO = dict(dim=8, hidden_dim=8, queue_size=16)


def _pair(backbone="resnet8_cifar_tiny", **kwargs):
    torch.manual_seed(0)
    sequential = ncl_hub.create_model(backbone, **kwargs)
    batched = copy.deepcopy(sequential).set_expert_execution("batched")
    return sequential, batched


def test_training_forward_backward_and_buffers_match():
    sequential, batched = _pair(num_classes=6, num_experts=3, moco=MOCO)
    g = torch.Generator().manual_seed(1)
    x, xk = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    outs = []
    for model in (sequential, batched):
        model.train()
        out = model.forward_train(x, xk)
        (out["logits"].logsumexp(-1).sum() + (out["query"] * out["key"]).sum()).backward()
        outs.append(out)
    for key in ("logits", "query", "key"):
        assert outs[1][key].shape == outs[0][key].shape
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=1e-4)
    grads = [(n, p.grad) for n, p in sequential.named_parameters() if p.requires_grad]
    batched_params = dict(batched.named_parameters())
    assert all(g is not None for _, g in grads)  # every expert's own parameters get a gradient
    for name, grad in grads:
        torch.testing.assert_close(batched_params[name].grad, grad, rtol=1e-4, atol=1e-5, msg=name)
    # BatchNorm running statistics of every trunk and key encoder are updated exactly as sequentially
    batched_buffers = dict(batched.named_buffers())
    for name, buf in sequential.named_buffers():
        torch.testing.assert_close(batched_buffers[name], buf, rtol=0, atol=1e-6, msg=name)
    tracked = [b for n, b in batched.trunks[0].named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(t.item() == 1 for t in tracked)


@pytest.mark.parametrize("backbone,size", [("test_resnet", 32), ("test_convnext", 32), ("test_efficientnet", 32),
                                           ("test_vit", 32)])
def test_timm_families_match_in_train_and_eval(backbone, size):
    kwargs = {"img_size": size} if "vit" in backbone else {}
    sequential, batched = _pair(backbone, num_classes=5, num_experts=2, classifier="cosine", **kwargs)
    x = torch.randn(4, 3, size, size)
    for train in (True, False):
        sequential.train(train)
        batched.train(train)
        with torch.no_grad():
            torch.testing.assert_close(batched.forward_experts(x), sequential.forward_experts(x), rtol=0, atol=1e-4)
            torch.testing.assert_close(batched(x), sequential(x), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_training_steps_match_sequential():
    """Three full steps (losses, SGD, momentum update, queue) give the same weights and queues."""
    from accelerate import Accelerator

    from conftest import lockstep, step_runner

    sequential, batched = _pair(num_classes=6, num_experts=3, moco=MOCO)
    counts = [40, 20, 10, 5, 3, 2]
    accelerator = Accelerator(cpu=True)
    runners = [step_runner(model, accelerator, counts, compile=False) for model in (sequential, batched)]
    for losses in lockstep(runners, seed=2):
        for k in losses[0]:
            torch.testing.assert_close(losses[1][k], losses[0][k], rtol=1e-4, atol=1e-4, msg=k)
    seq_state, bat_state = sequential.state_dict(), batched.state_dict()
    worst = max((bat_state[k].float() - v.float()).abs().max().item() for k, v in seq_state.items())
    assert worst < 1e-4, worst
    assert torch.equal(bat_state["moco.queue_ptr"], seq_state["moco.queue_ptr"])


def test_run_stacked_rejects_different_modules():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="identical modules"):
        run_stacked([a, b], torch.randn(2, 4))


def test_expert_execution_option_is_checked_and_applied():
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=RunConfig().model.num_experts)
    with pytest.raises(ValueError, match="unknown expert execution"):
        model.set_expert_execution("parallel")
    cfg = RunConfig()
    cfg.model.expert_execution = "parallel"
    with pytest.raises(ConfigError, match="expert_execution"):
        build_model(cfg, 4)
    cfg.model.expert_execution = "batched"
    built = build_model(cfg, 4)
    assert built.expert_execution == "batched"
    # a runtime setting: exports and state dicts do not change
    assert set(built.state_dict()) == set(model.state_dict())

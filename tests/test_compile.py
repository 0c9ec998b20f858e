"""The compiled training step computes what the eager one does (tiny model, CPU)."""
import copy

import pytest
import torch

import ncl_hub
from conftest import lockstep, step_runner


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["trunks", "step"])
def test_compiled_step_matches_eager(scope):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=6, num_experts=2,
                                 moco=dict(dim=8, hidden_dim=8, queue_size=16))
    counts = [40, 20, 10, 5, 3, 2]
    accelerator = Accelerator(cpu=True)
    models = [copy.deepcopy(model) for _ in (False, True)]
    runners = [step_runner(m, accelerator, counts, compile=compile, compile_scope=scope)
               for m, compile in zip(models, (False, True))]
    for out in lockstep(runners, seed=1):
        for k in out[0]:
            assert torch.allclose(out[0][k], out[1][k], rtol=1e-4, atol=1e-4), k
    eager, compiled = (m.state_dict() for m in models)
    worst = max(((eager[k].float() - compiled[k].float()).abs().max().item(), k) for k in eager)
    print("max abs weight difference", worst)
    assert worst[0] < 1e-4, worst
    # compilation leaves the model's modules, state dict and exports as they were
    assert set(models[1].state_dict()) == set(model.state_dict())


def test_channels_last_step_matches_the_default():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=6, num_experts=2)
    counts = [40, 20, 10, 5, 3, 2]
    accelerator = Accelerator(cpu=True)
    models = [copy.deepcopy(model), copy.deepcopy(model).to(memory_format=torch.channels_last)]
    runners = [step_runner(m, accelerator, counts, channels_last=cl) for m, cl in zip(models, (False, True))]
    for out in lockstep(runners, seed=2):
        for k in out[0]:
            assert torch.allclose(out[0][k], out[1][k], rtol=1e-4, atol=1e-4), k
    assert models[1].trunks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    default, channels_last = (m.state_dict() for m in models)
    assert max((default[k].float() - channels_last[k].float()).abs().max().item() for k in default) < 1e-4

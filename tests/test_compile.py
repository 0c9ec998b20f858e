"""The compiled training step computes what the eager one does (tiny model, CPU)."""
import copy

import pytest
import torch

import ncl_hub
from ncl_hub.losses import NCLLoss
from ncl_hub.training import StepRunner, TrainStep


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["trunks", "step"])
def test_compiled_step_matches_eager(scope):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=6, num_experts=2,
                                 moco=dict(dim=8, hidden_dim=8, queue_size=16))
    counts = [40, 20, 10, 5, 3, 2]
    accelerator = Accelerator(cpu=True)
    runners, models = [], []
    for compile in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=2e-4)
        step = TrainStep(m, NCLLoss(counts, validate_targets=False))
        runners.append(StepRunner(accelerator, step, opt, compile=compile, compile_scope=scope))
        models.append(m)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, xk = torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
        y = torch.randint(6, (16,), generator=g)
        out = []
        for runner in runners:
            torch.manual_seed(7)  # same random anchor expert in both
            out.append(runner(x, y, xk)[0])
        for k in out[0]:
            assert torch.allclose(out[0][k], out[1][k], rtol=1e-4, atol=1e-4), k
    eager, compiled = (m.state_dict() for m in models)
    worst = max(((eager[k].float() - compiled[k].float()).abs().max().item(), k) for k in eager)
    print("max abs weight difference", worst)
    assert worst[0] < 1e-4, worst
    # compilation leaves the model's modules, state dict and exports as they were
    assert set(models[1].state_dict()) == set(model.state_dict())

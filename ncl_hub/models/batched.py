"""Batched expert execution: K structurally identical modules run as one computation.

The K trunks of an NCL model have the same architecture and different weights. ``run_stacked`` stacks their
parameters and buffers along a new leading dimension and runs one ``torch.func.functional_call`` of the first
module under ``torch.vmap``: a convolution with batched weights becomes one grouped convolution, a linear layer one
batched matmul. On a GPU with small trunks (ResNet-32 at 32 px) this replaces K small kernels by one larger one;
on a CPU the sequential loop is as fast or faster, so sequential stays the default
(``NCLModel.set_expert_execution``).

Mathematically nothing changes: gradients reach every expert's own parameters through ``torch.stack``, and
buffers that a training forward updates in place (BatchNorm running statistics, ``num_batches_tracked``) are
written back to each module afterwards, so the model's state after a step equals the sequential path's.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn
from torch.func import functional_call

EXPERT_EXECUTION = ("sequential", "batched")


def _stack(modules: Sequence[nn.Module], kind: str) -> Dict[str, torch.Tensor]:
    named = [dict(m.named_parameters() if kind == "params" else m.named_buffers()) for m in modules]
    names = list(named[0])
    for k, d in enumerate(named[1:], start=1):
        if list(d) != names or any(d[n].shape != named[0][n].shape for n in names):
            raise ValueError(f"batched expert execution needs identical modules; module {k} differs from module 0 "
                             f"in its {kind}")
    return {n: torch.stack([d[n] for d in named]) for n in names}


def run_stacked(modules: Sequence[nn.Module], x: torch.Tensor, *, per_module_input: bool = False) -> torch.Tensor:
    """Run K identical modules as one vmapped call.

    Args:
        modules: K modules with the same parameter and buffer names and shapes (and the same training mode).
        x: one input for all modules (``[B, ...]``), or one per module (``[K, B, ...]``, ``per_module_input``).

    Returns:
        The stacked outputs ``[K, B, ...]``, equal to ``torch.stack([m(x) for m in modules])``.
    """
    base = modules[0]
    if any(m.training != base.training for m in modules):
        raise ValueError("batched expert execution needs all modules in the same train/eval mode")
    params = _stack(modules, "params")
    # fresh stacked copies: in-place buffer updates (BatchNorm in training mode) land there and are written back
    stacked_buffers = _stack(modules, "buffers")

    def call(p, b, inp):
        return functional_call(base, {**p, **b}, (inp,))

    out = torch.vmap(call, in_dims=(0, 0, 0 if per_module_input else None), randomness="different")(
        params, stacked_buffers, x)
    if base.training and stacked_buffers:
        with torch.no_grad():
            for k, module in enumerate(modules):
                for name, buf in module.named_buffers():
                    buf.copy_(stacked_buffers[name][k])
    return out

"""Running a model over a DataLoader: every expert's logits, under Accelerate (what training's validation, its
final evaluation and ``recipes/evaluate.py`` all use)."""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["predict"]


@torch.no_grad()
def predict(model: nn.Module, dataloader: Any, accelerator: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every expert's logits over a dataloader.

    Args:
        model: a module with ``forward_experts(x [B, 3, H, W]) -> [K, B, C]`` (e.g. NCLModel), possibly
            wrapped by ``accelerator.prepare``.
        dataloader: yields dicts with ``"pixel_values"`` [B, 3, H, W] and ``"label"`` [B].
        accelerator: an ``accelerate.Accelerator``; the model is unwrapped, run under
            ``accelerator.autocast()``, and batches are gathered with ``gather_for_metrics`` so that
            the samples padded onto the last batch of a distributed split are dropped.

    Returns:
        (expert logits [K, N, C] float32 on CPU, labels [N] int64 on CPU). The model is put in eval
        mode and every submodule's previous mode is restored afterwards. The logits are what the model
        returns: a model with a class prior (``NCLModel.set_class_prior``) returns adjusted ones, so to
        evaluate a prior, predict without it and pass it to :func:`evaluate_predictions`, which also needs
        the raw logits for the prior-shift records.
    """
    net = accelerator.unwrap_model(model) if accelerator is not None else model
    modes = [(module, module.training) for module in model.modules()]
    if net is not model:
        modes += [(module, module.training) for module in net.modules()]
    device = accelerator.device if accelerator is not None else _module_device(net)
    model.train(False)
    net.train(False)
    all_logits: List[torch.Tensor] = []
    all_labels: List[torch.Tensor] = []
    try:
        for batch in dataloader:
            if "pixel_values" not in batch or "label" not in batch:
                raise KeyError(f"batches must be dicts with 'pixel_values' and 'label'; got keys {list(batch)}")
            x = batch["pixel_values"]
            y = torch.as_tensor(batch["label"])
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            ctx = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            with ctx:
                logits = net.forward_experts(x)
            if logits.ndim != 3 or logits.shape[1] != x.shape[0]:
                raise ValueError(f"forward_experts must return [K, B, C] with B={x.shape[0]}, "
                                 f"got {tuple(logits.shape)}")
            # gather_for_metrics concatenates and de-duplicates along dim 0, so samples go first
            logits = logits.float().transpose(0, 1).contiguous()
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            all_logits.append(logits.cpu())
            all_labels.append(y.flatten().cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not all_logits:
        raise ValueError("the dataloader yielded no batches")
    return torch.cat(all_logits).transpose(0, 1).contiguous(), torch.cat(all_labels).long()


def _module_device(module: nn.Module) -> Optional[torch.device]:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else None

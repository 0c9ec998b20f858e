"""The MoCo-v2 branch of every expert (paper section 3.5): :class:`MocoBranch` holds the query projections, the
momentum key encoders and the queues of the K experts; it is training-only. Its settings are
:class:`ncl_hub.config.MocoConfig`, the one description of the branch: the ``moco`` section of a run's
configuration and the ``moco=`` argument of ``timm.create_model('ncl', ...)`` are the same class.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MocoConfig
from .batched import run_stacked

__all__ = ["MocoBranch"]


def _projection(in_features: int, hidden: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class MocoBranch(nn.Module):
    """Per-expert MoCo-v2 state: query projections, momentum key encoders, queues.

    Training-only: inference ``forward`` never touches it, exports drop it, and
    :meth:`NCLModel.num_inference_params` excludes it. Key encoders hold no gradient.

    Buffers: ``queue`` [K, N, dim] of L2-normalised keys, ``queue_ptr`` (scalar long).
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, trunks: nn.ModuleList, num_features: int, cfg: MocoConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim or num_features
        self.query_proj = nn.ModuleList(_projection(num_features, hidden, cfg.dim) for _ in trunks)
        self.key_trunks = copy.deepcopy(trunks)
        self.key_proj = copy.deepcopy(self.query_proj)
        for p in list(self.key_trunks.parameters()) + list(self.key_proj.parameters()):
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(len(trunks), cfg.queue_size, cfg.dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _pairs(self, trunks: nn.ModuleList):
        query = list(trunks.parameters()) + list(self.query_proj.parameters())
        key = list(self.key_trunks.parameters()) + list(self.key_proj.parameters())
        return query, key

    @torch.no_grad()
    def copy_from_query(self, trunks: nn.ModuleList) -> None:
        """Set every key encoder (trunk, projection, and trunk buffers) equal to its query side."""
        self.key_trunks.load_state_dict(trunks.state_dict())
        self.key_proj.load_state_dict(self.query_proj.state_dict())

    @torch.no_grad()
    def momentum_update(self, trunks: nn.ModuleList) -> None:
        """key <- m * key + (1 - m) * query for all K experts in one fused pass."""
        query, key = self._pairs(trunks)
        m = self.cfg.momentum
        torch._foreach_mul_(key, m)
        torch._foreach_add_(key, query, alpha=1.0 - m)

    @torch.no_grad()
    def encode_keys(self, x_key: torch.Tensor, key_trunks: Optional[Sequence[Callable]] = None,
                    batched: bool = False) -> torch.Tensor:
        """Second view [B, 3, H, W] -> normalised keys [K, B, dim]. ``key_trunks``: callables standing in for
        the key trunks (their compiled versions), or None; ``batched``: one vmapped call for all K."""
        if batched:
            keys = run_stacked(self.key_proj, run_stacked(self.key_trunks, x_key), per_module_input=True)
        else:
            trunks = key_trunks if key_trunks is not None else self.key_trunks
            keys = torch.stack([proj(trunk(x_key)) for trunk, proj in zip(trunks, self.key_proj)])
        return F.normalize(keys.float(), dim=-1)

    def project_queries(self, features: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Pooled query features [K, B, D] -> normalised queries [K, B, dim] (``batched``: one vmapped call)."""
        if batched:
            q = run_stacked(self.query_proj, features, per_module_input=True)
        else:
            q = torch.stack([proj(f) for proj, f in zip(self.query_proj, features.unbind(0))])
        return F.normalize(q.float(), dim=-1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [K, n, dim] (gathered from every process) over the oldest entries, wrapping."""
        size = self.queue.shape[1]
        if keys.shape[1] > size:
            keys = keys[:, -size:]
        n = keys.shape[1]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(1, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

"""The training engine: one training step (forward, loss, backward, optimizer and schedule step, MoCo updates),
checks that the loss stays finite, and checkpoints (save, find, load) that a kill never damages.

``recipes/train.py`` (through :mod:`ncl_hub.training.loop`) and ``benchmarks/train_step.py`` run exactly this
step."""
from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .. import files
from ..errors import UserError
from ..config import ConfigError
from ..models import NCLModel

__all__ = ["COMPILE_SCOPES", "LOSS_TERMS", "ModelWithLoss", "NonFiniteLossError", "Progress", "StepRunner",
           "check_finite", "find_checkpoint", "load_checkpoint", "reset_accelerator_state", "save_checkpoint",
           "unwrap"]

_logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("trunks", "step")
LOSS_TERMS = ("loss", "nil_all", "nil_hard", "nbod_all", "nbod_hard", "ce", "con")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- the step
class ModelWithLoss(nn.Module):
    """The model plus its loss as one module: what Accelerate prepares (DDP wraps this forward) and what
    ``torch.compile`` compiles. ``forward`` returns the loss terms and the MoCo keys to enqueue [K, B, dim]."""

    def __init__(self, model: NCLModel, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion
        # compiled stand-ins for the trunks (plain lists: not registered, so state dicts and exports are unchanged)
        self._trunk_fns: Optional[list] = None
        self._key_trunk_fns: Optional[list] = None

    def compile_trunks(self, mode: Optional[str] = None) -> None:
        """``torch.compile`` each query and key trunk for the training forward (heads, projections and losses
        stay eager). The trunks hold nearly all the compute, and compiling them one by one keeps the compiler's
        memory at one trunk's graph instead of the whole step's (docs/performance.md). The modules themselves
        are untouched: evaluation and exports use them as they are."""
        self._trunk_fns = [torch.compile(t, mode=mode) for t in self.model.trunks]
        if self.model.moco is not None:
            self._key_trunk_fns = [torch.compile(t, mode=mode) for t in self.model.moco.key_trunks]

    def forward(self, x: torch.Tensor, target: torch.Tensor, x_key: Optional[torch.Tensor] = None,
                anchor: Optional[torch.Tensor] = None):
        out = self.model.forward_train(x, x_key, trunks=self._trunk_fns, key_trunks=self._key_trunk_fns)
        losses = self.criterion(out["logits"], target, out.get("query"), out.get("key"), out.get("queue"),
                                anchor=anchor)
        return losses, out.get("key")


class StepRunner:
    """One training micro-step, the same for ``train`` and ``benchmarks/train_step.py``: forward and loss
    (compiled with ``torch.compile`` when asked), backward, and on each optimizer step the update, the
    schedule and the fused momentum update of the key encoders; then the MoCo keys gathered from every
    process are enqueued. No host sync: the random anchor expert is drawn from the generator of the batch's
    device (the CPU generator for CPU batches) and passed to the (possibly compiled) graph as a tensor.

    Args:
        accelerator: the run's Accelerator.
        step_module: the prepared :class:`ModelWithLoss`.
        optimizer: the prepared optimizer.
        scheduler: an LR scheduler stepped once per optimizer step (or None).
        compile: ``torch.compile`` the training forward. ``compile_scope="trunks"`` (default) compiles each
            trunk and key trunk on its own; ``"step"`` compiles the whole forward and loss as one graph (the
            same speed on a CPU, but the compiler's peak memory grows with K; batched expert execution always
            uses ``"step"``).
        compile_mode: ``torch.compile`` mode (None: the default); ``"reduce-overhead"`` replays the compiled code as
            CUDA graphs, and each step then begins with ``torch.compiler.cudagraph_mark_step_begin``.
        channels_last: give the model its inputs in channels-last memory format (the model should be converted with
            ``model.to(memory_format=torch.channels_last)`` before its optimizer is made).
        clip_grad_norm: optional gradient-norm clipping.
    """

    def __init__(self, accelerator, step_module: nn.Module, optimizer, scheduler=None, *, compile: bool = False,
                 compile_scope: str = "trunks", compile_mode: Optional[str] = None, channels_last: bool = False,
                 clip_grad_norm: Optional[float] = None):
        self.accelerator = accelerator
        self.step_module = step_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        inner = unwrap(step_module)
        self.model: NCLModel = inner.model
        self.criterion = inner.criterion
        self.steps_done = 0  # optimizer steps, when there is no scheduler to count them
        self.random_anchor = getattr(inner.criterion, "anchor", 0) is None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        compile_mode = None if compile_mode in (None, "default") else compile_mode
        self.cuda_graphs = bool(compile) and compile_mode == "reduce-overhead"
        self.channels_last = channels_last
        self.forward = step_module
        if compile and (compile_scope == "step" or self.model.expert_execution == "batched"):
            self.forward = torch.compile(step_module, mode=compile_mode)
        elif compile:
            inner.compile_trunks(compile_mode)

    def __call__(self, x: torch.Tensor, target: torch.Tensor, x_key: Optional[torch.Tensor] = None):
        """Returns (loss terms dict, whether an optimizer step happened)."""
        acc = self.accelerator
        if self.cuda_graphs:  # the graphs' outputs of the last step may be overwritten now (they were logged)
            torch.compiler.cudagraph_mark_step_begin()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            x_key = x_key.contiguous(memory_format=torch.channels_last) if x_key is not None else None
        anchor = torch.randint(self.model.num_experts, (1,), device=x.device) if self.random_anchor else None
        if hasattr(self.criterion, "set_step"):
            self.criterion.set_step(self.scheduler.last_epoch if self.scheduler is not None else self.steps_done)
        with acc.accumulate(self.step_module):
            losses, keys = self.forward(x, target, x_key, anchor)
            acc.backward(losses["loss"])  # divided by grad_accum inside
            if acc.sync_gradients and self.clip_grad_norm:
                acc.clip_grad_norm_(self.params, self.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if keys is not None:
            # every process enqueues the keys of all processes: the queues stay identical
            self.model.moco.enqueue(acc.gather(keys.detach().transpose(0, 1).contiguous()).transpose(0, 1))
        if acc.sync_gradients:
            self.steps_done += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self.model.momentum_update()
        return losses, acc.sync_gradients


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or getattr(module, "_orig_mod")
    return module


def check_finite(window: torch.Tensor, global_step: int, n: int) -> None:
    """Raise NonFiniteLossError naming the first bad step and term among the last ``n`` steps (one sync)."""
    if bool(torch.isfinite(window).all()):
        return
    rows = window.shape[0]
    for back in range(n - 1, -1, -1):
        step = global_step - back
        row = window[(step - 1) % rows]
        bad = [f"{k}={v}" for k, v in zip(LOSS_TERMS, row.tolist()) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {step}: {', '.join(bad)}. The run stopped: lower the "
                "learning rate, check the data, or try --mixed_precision no.")


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Where the run is; saved as progress.json in every checkpoint (plain JSON: nothing is unpickled)."""

    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # micro-batches of the current epoch already trained on this process
    global_step: int = 0  # optimizer steps so far
    best_metric: float = -1.0
    best_epoch: int = -1
    selected_expert: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    partial_sums: List[float] = field(default_factory=list)  # loss sums of the current epoch so far



def _checkpoint_dirs(output_dir: Path) -> List[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp"):
            _logger.warning("skipping incomplete checkpoint %s (an interrupted save)", p)
        elif p.is_dir() and (p / "progress.json").is_file():
            done.append(p)
    return sorted(done, key=_checkpoint_step)


def _checkpoint_step(folder: Path) -> int:
    try:
        return int(files.read_json(folder / "progress.json", fix=f"Delete the checkpoint folder {folder}: --resume "
                                   "then continues from the previous checkpoint.")["global_step"])
    except (files.DamagedFileError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint {folder}: {e}") from e


def find_checkpoint(output_dir: Path, resume: str) -> Optional[Path]:
    """``latest`` -> the newest complete checkpoint of ``output_dir`` (None if there is none yet: the run
    starts from the beginning); otherwise the given folder, which must be complete. Every file of the checkpoint
    is checked (a truncated, empty or foreign file is a ConfigError naming it), before anything is written."""
    if resume == "latest":
        found = _checkpoint_dirs(output_dir)
        path = found[-1] if found else None
    else:
        path = Path(resume)
        if not (path / "progress.json").is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no progress.json)")
    if path is not None:
        try:
            files.check_checkpoint_folder(path)
        except files.DamagedFileError as e:
            raise ConfigError(f"--resume: {e}") from e
    return path


def save_checkpoint(accelerator, output_dir: Path, progress: Progress, scheduler, keep_last: int, tag: str) -> Path:
    """accelerator.save_state (model as safetensors, optimizer and RNG states) plus progress and schedule as JSON,
    into a temporary folder, then an atomic rename: a kill during the save never damages an earlier checkpoint.
    Prunes all but the last ``keep_last`` checkpoints."""
    root = output_dir / "checkpoints"
    final = root / tag
    tmp = root / f".tmp-{tag}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files.write_json(tmp / "scheduler.json", scheduler.state_dict(), indent=None)
        files.write_json(tmp / "progress.json", progress.__dict__, indent=None)  # written last: marks completeness
        files.swap_folder(tmp, final)
        epochs = [p for p in _checkpoint_dirs(output_dir)]
        for old in epochs[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path, scheduler, run_config: Path) -> Progress:
    """Restore a run from checkpoint ``ckpt``: model from safetensors, optimizer and RNG states with
    ``torch.load(weights_only=True)``, schedule and progress from JSON. A checkpoint of another model or optimizer
    setup is a ConfigError that says to resume with ``run_config`` (the run's own config.yaml)."""
    try:
        accelerator.load_state(str(ckpt))
    except (RuntimeError, ValueError, KeyError) as e:  # another model or optimizer than the one saved
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--resume: checkpoint {ckpt} does not fit this run ({type(e).__name__}: {first}). It was saved by "
            f"another model or optimizer setup: resume with the run's own config.yaml (--config {run_config}), or "
            "start a new run in another --output_dir.") from e
    progress = Progress()
    progress.__dict__.update(files.read_json(ckpt / "progress.json"))
    scheduler.load_state_dict(files.read_json(ckpt / "scheduler.json"))
    return progress


def reset_accelerator_state() -> None:
    """Let one Python process run ``train`` several times (a notebook, the test suite) with different precision.

    Accelerate keeps its state in a process-wide singleton that refuses a second ``mixed_precision`` and offers no
    public way to clear it, so this calls its ``AcceleratorState._reset_state`` (what Accelerate's own test cases
    do between tests); the process group (``PartialState``) is kept. Nothing else in ncl_hub touches Accelerate's
    private names.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)

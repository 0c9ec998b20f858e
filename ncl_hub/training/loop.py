"""NCL training with Accelerate, read top to bottom as its phases: set up, train one epoch, validate and select,
finish (evaluate the best model, export, publish). The logic behind ``recipes/train.py``.

Run folder (``cfg.output_dir``)::

    config.yaml        the resolved configuration
    run_info.json      class names and counts, selection results, timings, the command
    checkpoints/       epoch_XXXX[_step_YYYYYY]/ accelerator.save_state folders (the last keep_last)
    best/              the best-on-validation ensemble (hub.save_pretrained layout)
    eval/              metrics.json, summary.md, plots
    export/ensemble/   hub-ready ensemble;  export/expert/  the selected single expert
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import files, hub
from ..calibration import fit_model_calibration
from ..config import ConfigError, RunConfig, check_config, config_to_dict, flat_config, save_config
from ..data import DataBundle, build_data, build_eval_loader, build_train_loader
from ..data.checks import describe_row
from ..data.tensor import build_tensor_loaders, check_tensor_pipeline
from ..evaluate import evaluate_predictions, format_summary, predict, record_absent_classes, split_metrics, write_report
from ..models import NCLModel
from ..version import __version__
from .build import build_criterion, build_model, build_optimizer, build_scheduler, describe_schedule
from .engine import (
    LOSS_TERMS, ModelWithLoss, NonFiniteLossError, Progress, StepRunner, check_finite, find_checkpoint,
    load_checkpoint, reset_accelerator_state, save_checkpoint, unwrap,
)

__all__ = ["train", "code_version"]

# compile=null (auto) compiles runs at least this long: on 2 CPU cores the ResNet-32 x 3 + MoCo trunks compile in
# about 2 minutes (cold cache) and then the step runs about 1.5x faster (benchmarks/train_step.py,
# docs/performance.md)
COMPILE_MIN_STEPS = 2000


@dataclass
class _Run:
    """Everything the phases of one run share."""

    cfg: RunConfig
    accelerator: Any
    output_dir: Path
    data: DataBundle
    model: NCLModel  # unwrapped: evaluation and exports use it
    step: StepRunner
    train_loader: Any
    train_set: Any  # the EpochSeededDataset (pil) or the TensorTrainLoader (tensor), and the sampler: both follow
    # the epoch (taken before prepare)
    sampler: Any
    eval_loaders: Dict[str, Any]
    scheduler: Any
    steps_per_epoch: int
    images_per_step: int
    progress: Progress
    t_start: float


def train(cfg: RunConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train, select on validation, evaluate and export. Returns the final metrics and paths.

    Accelerate's process-wide state (precision, accumulation) is fresh at the start and cleared at the end, so
    a run leaves nothing behind for later code in the same process (the process group is kept).
    """
    reset_accelerator_state()
    try:
        run = _set_up(cfg)
        for epoch in range(run.progress.epoch, cfg.epochs):
            try:
                record = _train_one_epoch(run, epoch)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} {_last_checkpoint(run.output_dir)}") from e
            _validate_and_select(run, epoch, record)
            _end_epoch(run, epoch, record)
        return _finish(run, argv)
    finally:
        reset_accelerator_state()


def _last_checkpoint(output_dir: Path) -> str:
    found = find_checkpoint(output_dir, "latest")
    if found is None:
        return "No checkpoint had been saved yet."
    return f"The last good checkpoint is kept: {found} (continue from it with --resume and a lower rate)."


# ---------------------------------------------------------------------------------------------- set up
def _set_up(cfg: RunConfig) -> _Run:
    """Check the options, start Accelerate, build data, model, loss and loaders, prepare them, resume."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    t_start = time.time()
    output_dir = Path(cfg.output_dir)
    check_config(cfg)
    _check_output_dir(cfg, output_dir)
    ckpt = find_checkpoint(output_dir, cfg.resume) if cfg.resume else None  # checked before anything is written
    accelerator = Accelerator(
        cpu=_cpu_multiprocess(), mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    micro_batch = _micro_batch(cfg, accelerator.num_processes)
    if cfg.data.pipeline == "tensor":
        check_tensor_pipeline(cfg, accelerator.num_processes)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(cfg.seed)
    data = build_data(cfg)
    if len(data.train) < cfg.data.batch_size:
        raise ConfigError(f"the training split ({len(data.train)} images) is smaller than one batch "
                          f"({cfg.data.batch_size}); lower --data.batch_size")
    model = build_model(cfg, data.num_classes, data.class_names)
    criterion = build_criterion(cfg, data.class_counts)
    _prepare_output_dir(cfg, accelerator, output_dir, resumed=ckpt is not None)
    _print_start(accelerator, cfg, data, model)
    run = _prepare(cfg, accelerator, output_dir, data, model, criterion, micro_batch, t_start)
    if ckpt is not None:
        run.progress = load_checkpoint(accelerator, ckpt, run.scheduler, output_dir / "config.yaml")
        if accelerator.is_main_process:  # a resumed run's config.yaml is rewritten once its checkpoint has loaded
            save_config(cfg, output_dir / "config.yaml")
        accelerator.print(f"resumed from {ckpt}: epoch {run.progress.epoch + 1}, step {run.progress.global_step}")
    elif cfg.resume:
        accelerator.print(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'} yet; starting at "
                          "the beginning")
    if cfg.log_with:
        accelerator.init_trackers("ncl", config=_tracker_config(cfg))
    return run


def _prepare(cfg: RunConfig, accelerator, output_dir: Path, data: DataBundle, model: NCLModel, criterion,
             micro_batch: int, t_start: float) -> _Run:
    """Loaders, optimizer and the model-with-loss through ``accelerator.prepare`` (the tensor pipeline's loaders
    are on the device already); schedule and step runner."""
    if cfg.channels_last:  # before the optimizer is made: it keeps the parameters it is given
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.data.pipeline == "tensor":
        train_loader, eval_loaders = build_tensor_loaders(cfg, data, model, micro_batch, accelerator.device,
                                                          log=accelerator.print)
        train_set, sampler = train_loader, train_loader.sampler
        step_module, optimizer = accelerator.prepare(ModelWithLoss(model, criterion), optimizer)
    else:
        train_loader = build_train_loader(cfg, data, model, micro_batch)
        train_set, sampler = train_loader.dataset, train_loader.sampler
        eval_loaders = {name: build_eval_loader(cfg, ds, model.pretrained_cfg, split=name)
                        for name, ds in (("val", data.val), ("test", data.test)) if ds is not None}
        step_module, optimizer, train_loader = accelerator.prepare(ModelWithLoss(model, criterion), optimizer,
                                                                   train_loader)
        eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    use_compile = cfg.compile if cfg.compile is not None else steps_per_epoch * cfg.epochs >= COMPILE_MIN_STEPS
    step = StepRunner(accelerator, step_module, optimizer, scheduler, compile=use_compile,
                      compile_scope=cfg.compile_scope, compile_mode=cfg.compile_mode,
                      channels_last=cfg.channels_last, clip_grad_norm=cfg.optim.clip_grad_norm)
    compiled = f"torch.compile ({cfg.compile_scope}, mode {cfg.compile_mode})" if use_compile else "eager"
    accelerator.print(f"step: {compiled}, {cfg.model.expert_execution} experts ({steps_per_epoch} optimizer steps "
                      f"per epoch of {cfg.data.batch_size} images, {accelerator.num_processes} process(es), "
                      f"{accelerator.mixed_precision} mixed precision"
                      f"{', channels-last' if cfg.channels_last else ''}, {cfg.data.pipeline} input pipeline)")
    for line in describe_schedule(steps_per_epoch, cfg):
        accelerator.print(line)
    return _Run(cfg=cfg, accelerator=accelerator, output_dir=output_dir, data=data, model=unwrap(step_module).model,
                step=step, train_loader=train_loader, train_set=train_set, sampler=sampler,
                eval_loaders=eval_loaders, scheduler=scheduler, steps_per_epoch=steps_per_epoch,
                images_per_step=micro_batch * accelerator.num_processes * cfg.grad_accum, progress=Progress(),
                t_start=t_start)


def _micro_batch(cfg: RunConfig, num_processes: int) -> int:
    """The per-process micro-batch size; the effective batch must split evenly over processes x accumulation."""
    per_step = num_processes * cfg.grad_accum
    if cfg.data.batch_size < per_step:
        raise ConfigError(f"batch_size {cfg.data.batch_size} is smaller than processes x grad_accum = {per_step}: "
                          "every process needs at least one image per micro-batch")
    if cfg.data.batch_size % per_step:
        raise ConfigError(f"batch_size {cfg.data.batch_size} must be divisible by processes x grad_accum = "
                          f"{per_step} so that the effective batch is exactly batch_size")
    return cfg.data.batch_size // per_step


def _check_output_dir(cfg: RunConfig, output_dir: Path) -> None:
    holds_run = (output_dir / "config.yaml").exists() or (output_dir / "checkpoints").exists()
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output folder {output_dir} holds another run; pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another --output_dir")


def _prepare_output_dir(cfg: RunConfig, accelerator, output_dir: Path, *, resumed: bool) -> None:
    if cfg.overwrite and accelerator.is_main_process and not cfg.resume:
        for sub in ("checkpoints", "best", "eval", "export", "logs"):
            shutil.rmtree(output_dir / sub, ignore_errors=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            save_config(cfg, output_dir / "config.yaml")


def _print_start(accelerator, cfg: RunConfig, data: DataBundle, model: NCLModel) -> None:
    n_max, n_min = max(data.class_counts), min(data.class_counts)
    accelerator.print(
        f"data: {data.source} | {data.num_classes} classes | train {len(data.train)} images "
        f"(max {n_max}, min {n_min}, IF {n_max / n_min:.1f}) "
        f"| val {len(data.val) if data.val is not None else 0} | test {len(data.test) if data.test is not None else 0}")
    for note in data.notes:
        accelerator.print(f"data: {note}")
    accelerator.print(f"model: {model.num_experts} x {model.backbone} ({model.classifier} heads), "
                      f"{model.num_inference_params() / 1e6:.2f}M inference parameters, loss {cfg.loss.name}"
                      f"{' + MoCo' if model.moco is not None else ''}")


# ---------------------------------------------------------------------------------------------- one epoch
class _LossLog:
    """Loss terms of the last ``log_every`` optimizer steps (on the device: no sync per step) and the epoch's sums;
    checked for finiteness, shown on the progress bar and sent to the tracker every ``log_every`` steps."""

    def __init__(self, run: _Run, bar):
        self.run, self.bar, self.every = run, bar, max(1, run.cfg.log_every)
        device, progress = run.accelerator.device, run.progress
        self.window = torch.zeros(self.every, len(LOSS_TERMS), device=device)
        resumed = progress.batches_done and progress.partial_sums
        self.sums = torch.tensor(progress.partial_sums if resumed else [0.0] * len(LOSS_TERMS), device=device)
        self.steps, self.t_window = 0, time.time()

    def add(self, losses: Dict[str, torch.Tensor]) -> None:
        row = torch.stack([losses.get(k, self.sums.new_zeros(())).detach().float() for k in LOSS_TERMS])
        self.window[self.run.progress.global_step % self.every] = row
        self.sums += row
        self.run.progress.global_step += 1
        self.steps += 1
        self.bar.update(1)

    def check(self) -> None:
        check_finite(self.window, self.run.progress.global_step, min(self.every, self.steps))

    def report(self) -> None:
        run, step = self.run, self.run.progress.global_step
        self.check()
        last = self.window[(step - 1) % self.every]
        lr = run.scheduler.get_last_lr()[0]
        if run.accelerator.is_local_main_process:
            rate = run.images_per_step * ((self.steps - 1) % self.every + 1) / max(1e-9, time.time() - self.t_window)
            self.bar.set_postfix(loss=f"{last[0].item():.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.4g}")
        self.t_window = time.time()
        if run.cfg.log_with:
            run.accelerator.log({f"train/{k}": v for k, v in zip(LOSS_TERMS, last.tolist())} | {"lr": lr}, step=step)


def _train_one_epoch(run: _Run, epoch: int) -> Dict[str, Any]:
    """Train ``epoch`` (from where a resumed run stopped in it); returns its record (losses, rate, time)."""
    from tqdm.auto import tqdm

    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    progress.epoch = epoch
    run.train_set.epoch = epoch  # epoch-aware augmentation seeds and sampler
    run.sampler.set_epoch(epoch)
    run.step.step_module.train()
    skip = progress.batches_done
    if cfg.data.pipeline == "tensor":  # augmentation parameters belong to positions in the epoch: start at `skip`
        loader = run.train_loader.iter_from(skip)
    else:
        loader = acc.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    steps_left = run.steps_per_epoch - skip // cfg.grad_accum
    bar = tqdm(total=run.steps_per_epoch, initial=skip // cfg.grad_accum, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               # no bar in a log file (a study's train.log): the epoch lines say the same
               disable=not acc.is_local_main_process or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
    log, t_epoch = _LossLog(run, bar), time.time()
    for batch in loader:
        losses, stepped = run.step(batch["pixel_values"], batch["label"], batch.get("key_values"))
        progress.batches_done += 1
        if not stepped:
            continue
        log.add(losses)
        if progress.global_step % log.every == 0 or log.steps == steps_left:
            log.report()
        if cfg.save_every_steps and progress.global_step % cfg.save_every_steps == 0 and log.steps < steps_left:
            log.check()
            progress.partial_sums = log.sums.tolist()
            save_checkpoint(acc, run.output_dir, progress, run.scheduler, cfg.keep_last,
                            f"epoch_{epoch:04d}_step_{progress.global_step:07d}")
        if log.steps >= steps_left:
            break
    bar.close()
    log.check()
    elapsed = time.time() - t_epoch
    means = {k: v for k, v in zip(LOSS_TERMS, (log.sums / max(1, skip // cfg.grad_accum + log.steps)).tolist())
             if v != 0.0}
    return {"epoch": epoch + 1, "step": progress.global_step, "lr": run.scheduler.get_last_lr()[0],
            "time_s": round(elapsed, 2), "images_per_s": round(run.images_per_step * log.steps / max(elapsed, 1e-9), 1),
            **{f"train_{k}": round(v, 4) for k, v in means.items()}}


# ---------------------------------------------------------------------------------------------- validate, select
def _validate_and_select(run: _Run, epoch: int, record: Dict[str, Any]) -> None:
    """Top-1 on the validation split; a better ensemble becomes best/ and its best expert the selected one. Without
    a validation split the last epoch is the model and expert 0 the single expert."""
    progress = run.progress
    skipped = run.train_set.skipped
    if skipped:
        record["skipped_images"] = len(skipped)
        where = "; ".join(describe_row(run.data.train, "train", i) for i in skipped[:10])
        run.accelerator.print(f"warning: {len(skipped)} training image(s) turned unreadable after the check and were "
                              f"skipped (another image took their place): {where}")
    if "val" not in run.eval_loaders:
        progress.best_epoch, progress.selected_expert = epoch + 1, 0
        _save_best(run)
        return
    logits, target = predict(run.model, run.eval_loaders["val"], run.accelerator)
    val = split_metrics(logits, target, run.data.class_counts, test_imbalances=())  # selection: top-1 only
    record["val_top1"] = val["ensemble"]["top1"]
    record["val_expert_top1"] = [e["top1"] for e in val["experts"]]
    if val["ensemble"]["top1"] > progress.best_metric:
        progress.best_metric, progress.best_epoch = val["ensemble"]["top1"], epoch + 1
        progress.selected_expert = int(val["best_expert"])
        _save_best(run)


def _save_best(run: _Run) -> None:
    if run.accelerator.is_main_process:
        hub.save_pretrained(run.model, run.output_dir / "best", variant="ensemble", config=config_to_dict(run.cfg),
                            class_names=run.data.class_names, class_counts=run.data.class_counts)
    run.accelerator.wait_for_everyone()


def _end_epoch(run: _Run, epoch: int, record: Dict[str, Any]) -> None:
    """Record the epoch, print and log it, and checkpoint the end of the epoch."""
    progress, acc = run.progress, run.accelerator
    progress.history.append(record)
    acc.print(_epoch_line(record, progress))
    if run.cfg.log_with:
        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=progress.global_step)
    progress.epoch, progress.batches_done, progress.partial_sums = epoch + 1, 0, []
    save_checkpoint(acc, run.output_dir, progress, run.scheduler, run.cfg.keep_last, f"epoch_{epoch:04d}")


def _epoch_line(record: Dict[str, Any], progress: Progress) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    for k in ("nil_all", "nil_hard", "nbod_all", "nbod_hard", "ce", "con"):
        if f"train_{k}" in record:
            parts.append(f"{k} {record[f'train_{k}']:.4f}")
    if "val_top1" in record:
        parts.append(f"val {record['val_top1']:.2f} (best {progress.best_metric:.2f} @ {progress.best_epoch})")
    parts += [f"lr {record['lr']:.4g}", f"{record['images_per_s']:.0f} img/s", f"{record['time_s']:.1f}s"]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- finish
def _finish(run: _Run, argv: Optional[List[str]]) -> Dict[str, Any]:
    """The best model on every evaluation split, the report, run_info.json, the exports, and the Hub."""
    cfg, acc, data, progress = run.cfg, run.accelerator, run.data, run.progress
    acc.wait_for_everyone()
    best = hub.load_model(f"local-dir:{run.output_dir / 'best'}").to(acc.device)
    predictions = {name: predict(best, run.eval_loaders[name], acc) for name in cfg.eval_splits
                   if name in run.eval_loaders}
    calibration = _calibrate(run, best, predictions)
    selected = progress.selected_expert
    metrics = evaluate_predictions(predictions, data.class_counts, selected_expert=selected, calibration=calibration)
    for line in record_absent_classes(metrics, {"val": data.val, "test": data.test}, data.class_names):
        acc.print(line)
    result: Dict[str, Any] = {"metrics": metrics, "output_dir": str(run.output_dir), "best_epoch": progress.best_epoch,
                              "selected_expert": selected, "history": progress.history}
    if acc.is_main_process:
        title = f"NCL on {data.source}"
        result["report"] = {k: str(v) for k, v in write_report(metrics, run.output_dir / "eval", title=title).items()}
        run_info = _run_info(run, argv)
        files.write_json(run.output_dir / "run_info.json", run_info)
        common = dict(metrics=metrics, config=config_to_dict(cfg), class_names=data.class_names,
                      class_counts=data.class_counts, plots_dir=run.output_dir / "eval",
                      command=run_info["command"], run_info=run_info)
        export = run.output_dir / "export"
        hub.save_pretrained(best, export / "ensemble", variant="ensemble", **common)
        hub.save_pretrained(best, export / "expert", variant="expert", expert_index=selected, **common)
        acc.print(format_summary(metrics, title=title))
        acc.print(f"wrote {export} (ensemble, and expert {selected} chosen on "
                  f"{'validation' if data.val is not None else 'nothing: no validation split'}) "
                  f"in {time.time() - run.t_start:.0f}s")
        if cfg.push_to_hub:
            result["hub"] = hub.publish(run.output_dir, cfg.push_to_hub, private=cfg.hub_private)
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _calibrate(run: _Run, best: NCLModel, predictions: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Calibration maps of the best model's ensemble and experts, and the prior-estimation shrinkage, fitted on the
    validation split; set on the model and saved with best/ (and so with every export). None without validation."""
    if "val" not in run.eval_loaders:
        run.accelerator.print("calibration: none (no validation split to fit it on)")
        return None
    logits, labels = predictions.get("val") or predict(best, run.eval_loaders["val"], run.accelerator)
    calibration = fit_model_calibration(logits, labels, class_counts=run.data.class_counts, split="val")
    best.set_calibration(calibration)
    if run.accelerator.is_main_process:
        hub.save_pretrained(best, run.output_dir / "best", variant="ensemble", config=config_to_dict(run.cfg),
                            class_names=run.data.class_names, class_counts=run.data.class_counts)
    ens = calibration["ensemble"]
    run.accelerator.print(f"calibration: {ens['method']} fitted on val ({calibration['num_samples']} images): T = "
                          f"{ens['temperature']:.3f}, NLL {ens['nll_before']:.4f} -> {ens['nll_after']:.4f}; prior "
                          f"estimation shrinkage {calibration['prior_shrinkage']:g}")
    run.accelerator.wait_for_everyone()
    return calibration


def _run_info(run: _Run, argv: Optional[List[str]]) -> Dict[str, Any]:
    """run_info.json: what the run trained on, what it selected, how long it took, the command and the code."""
    cfg, data, progress = run.cfg, run.data, run.progress
    return {
        "class_names": data.class_names, "class_counts": data.class_counts, "dataset": data.source,
        "imbalance_factor": cfg.data.imbalance_factor, "command": _command(argv),
        "best_epoch": progress.best_epoch, "selected_expert": progress.selected_expert, "epochs": cfg.epochs,
        "wall_time_s": round(time.time() - run.t_start, 1), "num_processes": run.accelerator.num_processes,
        "commit": code_version(), "history": progress.history,
        "skipped_train_images": run.train_set.skipped,
        "unreadable_images": data.unreadable,
    }


def code_version() -> str:
    """The git commit of the ncl_hub code that runs (``-dirty`` with uncommitted changes to tracked files), or the
    package version outside a git checkout: recorded with every run."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"ncl-hub {__version__}"


def _cpu_multiprocess() -> bool:
    """torchrun/accelerate launched several processes on a machine without a GPU: Accelerate only picks
    gloo CPU data parallelism when told ``cpu=True``."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _tracker_config(cfg: RunConfig) -> Dict[str, Any]:
    """The configuration as trackers take it: dotted keys, scalar values (others as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(cfg).items()}


def _command(argv: Optional[List[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python recipes/train.py", *args]).strip()

#!/usr/bin/env python
"""Benchmark one complete NCL training step against its compute floor (not part of the test suite).

One step = forward of every expert (and of every MoCo key encoder), all losses, backward, optimizer step,
momentum update and queue update: exactly ``ncl_hub.training.StepRunner``, the path ``recipes/train.py``
runs. Random data; the median of ``--steps`` steps after ``--warmup`` steps.

The compute floor, measured in the same process: K x (one plain training step of the same timm trunk with a
linear head, cross-entropy and the same SGD) + K x (one no-grad forward of the trunk) when MoCo is on.

Each setting and mode runs in its own subprocess so that peak memory is its own:
CPU: growth of the peak resident set size (VmHWM, reset once the model, optimizer and data exist) over all
the training steps, the first (compiling) one included; GPU: torch.cuda.max_memory_allocated.

    python benchmarks/train_step.py                      # the CPU settings, eager and compiled
    python benchmarks/train_step.py --device cuda        # adds batch 256 and ncl_resnet50_imagenetlt at 224 px
    python benchmarks/train_step.py --only "resnet32_cifar/b64/moco" --modes eager,batched

Modes: eager; compiled (torch.compile of each trunk, what long runs of recipes/train.py use); compiled_step (the
whole forward + loss as one compiled graph); bf16 (compiled trunks under bf16 autocast);
batched and batched_compiled (the K experts as one vmapped computation, ``model.expert_execution=batched``).
A mode may add switches with ``+``: ``+bf16`` (bf16 autocast), ``+cl`` (channels-last model and inputs), ``+cg``
(``torch.compile(mode="reduce-overhead")``: CUDA graphs), e.g. ``compiled_step+cg+bf16+cl``; the same switches as
recipes/train.py's ``--mixed_precision bf16``, ``--channels_last`` and ``--compile_mode reduce-overhead``.
Every mode but eager is timed against an eager twin in the same process ("vs eager").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CIFAR_MOCO = dict(dim=64, hidden_dim=64, queue_size=1024)


def settings(device: str):
    out = []
    for batch in (64, 128) + ((256,) if device == "cuda" else ()):
        for moco in (True, False):
            out.append(dict(name=f"resnet32_cifar/b{batch}/{'moco' if moco else 'nomoco'}", backbone="resnet32_cifar",
                            num_experts=3, num_classes=100, size=32, batch=batch, moco=CIFAR_MOCO if moco else None,
                            classifier="linear"))
    if device == "cuda":
        out.append(dict(name="ncl_resnet50_imagenetlt/b64/nomoco", backbone="resnet50", num_experts=3,
                        num_classes=1000, size=224, batch=64, moco=None, classifier="cosine"))
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


BASES = ("eager", "compiled", "compiled_step", "batched", "batched_compiled")
SWITCHES = ("bf16", "cl", "cg")


def parse_mode(mode: str):
    """``base+switch+...`` -> (base, set of switches); ``bf16`` alone is ``compiled+bf16`` (the earlier mode)."""
    parts = mode.split("+")
    base, switches = (parts[0], set(parts[1:])) if parts[0] in BASES else ("compiled", set(parts))
    unknown = switches - set(SWITCHES)
    if unknown:
        raise ValueError(f"mode {mode!r}: unknown switch(es) {sorted(unknown)}; bases {BASES}, switches {SWITCHES}")
    return base, switches


def _build(setting: dict, mode: str, device: str, accelerator):
    import torch

    import ncl_hub
    from ncl_hub.losses import NCLLoss
    from ncl_hub.training import ModelWithLoss, StepRunner

    base, switches = parse_mode(mode)
    K, C = setting["num_experts"], setting["num_classes"]
    model = ncl_hub.create_model(setting["backbone"], num_classes=C, num_experts=K,
                                 classifier=setting["classifier"], moco=setting["moco"]).to(device)
    if "cl" in switches:
        model = model.to(memory_format=torch.channels_last)
    counts = [max(1, int(500 * 100 ** (-i / (C - 1)))) for i in range(C)]
    criterion = NCLLoss(counts, validate_targets=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                nesterov=True, weight_decay=2e-4)
    if base.startswith("batched"):
        model.set_expert_execution("batched")
    step_module, optimizer = accelerator.prepare(ModelWithLoss(model, criterion), optimizer)
    step_module.train()
    return StepRunner(accelerator, step_module, optimizer, compile=base not in ("eager", "batched"),
                      compile_scope="step" if base == "compiled_step" else "trunks",
                      compile_mode="reduce-overhead" if "cg" in switches else None, channels_last="cl" in switches)


def run_one(setting: dict, mode: str, device: str, steps: int, warmup: int, threads: int) -> dict:
    """Phase 1: memory and first-step time of ``mode`` alone. Phase 2: interleaved timing rounds of the
    ``mode`` step, (for compiled modes) an eager twin, and the compute floor, so that the machine's drift
    hits all of them alike; ratios are medians of per-round ratios."""
    import torch
    import timm
    from accelerate import Accelerator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    K, C, B, S = setting["num_experts"], setting["num_classes"], setting["batch"], setting["size"]
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if "bf16" in parse_mode(mode)[1] else "no")
    runner = _build(setting, mode, device, accelerator)
    x = torch.randn(B, 3, S, S, device=dev)
    x_key = torch.randn(B, 3, S, S, device=dev) if setting["moco"] else None
    y = torch.randint(C, (B,), device=dev)
    # phase 1: memory (the step under test only)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    runner(x, y, x_key)  # the first step: compilation when compiled
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup + 3):
        runner(x, y, x_key)
    sync()
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # peak RSS growth over the training steps (the first included) above the set-up's memory
        peak_mib = max(0.0, _peak_rss_mib() - rss0)

    # phase 2: interleaved timing
    trunk = timm.create_model(setting["backbone"], num_classes=C).to(dev).train()
    opt = torch.optim.SGD(trunk.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=2e-4)

    def floor_step():  # K plain trunk training steps + K no-grad trunk forwards (the MoCo key encoders)
        for _ in range(K):
            loss = torch.nn.functional.cross_entropy(trunk(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if x_key is not None:
            with torch.no_grad():
                for _ in range(K):
                    trunk.forward_head(trunk.forward_features(x_key), pre_logits=True)

    timed = {"step": lambda: runner(x, y, x_key), "floor": floor_step}
    if mode != "eager":
        eager = _build(setting, "eager", device, accelerator)
        timed["eager"] = lambda: eager(x, y, x_key)
    for fn in timed.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in timed}
    for _ in range(steps):
        for k, fn in timed.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)  # noqa: E731
    result = dict(setting=setting["name"], mode=mode, device=device, batch=B, threads=threads,
                  step_ms=round(med["step"] * 1e3, 2), images_per_s=round(B / med["step"], 1),
                  floor_ms=round(med["floor"] * 1e3, 2), floor_images_per_s=round(B / med["floor"], 1),
                  step_over_floor=ratio("step", "floor"), peak_memory_mib=round(peak_mib, 1),
                  first_step_s=round(first_step_s, 2))
    if "eager" in med:
        result.update(eager_images_per_s=round(B / med["eager"], 1), speedup_over_eager=ratio("eager", "step"))
    return result


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", default=None,
                   help="comma list of eager, compiled, compiled_step, bf16, batched (vmapped experts, eager), "
                        "batched_compiled, each optionally +bf16, +cl (channels-last), +cg (CUDA graphs) "
                        "(default: eager,compiled; on cuda also bf16, batched, batched_compiled, "
                        "compiled_step+cg+bf16+cl)")
    p.add_argument("--only", default=None, help="run only settings whose name contains this")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        setting, mode = json.loads(args.child)
        print("RESULT " + json.dumps(run_one(setting, mode, args.device, args.steps, args.warmup, args.threads)))
        return []
    default_modes = ("eager,compiled,bf16,batched,batched_compiled,compiled_step+cg+bf16+cl" if args.device == "cuda"
                     else "eager,compiled")
    modes = (args.modes or default_modes).split(",")
    for mode in modes:
        parse_mode(mode)  # an unknown mode fails here, not in a child process
    rows = []
    for setting in settings(args.device):
        if args.only and args.only not in setting["name"]:
            continue
        for mode in modes:
            cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads), "--child", json.dumps([setting, mode])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{setting['name']} {mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(line[7:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'setting':<34} {'mode':<24} {'img/s':>8} {'floor img/s':>11} {'step/floor':>10} {'vs eager':>9} "
          f"{'peak MiB':>9} {'1st step s':>10}")
    for r in rows:
        print(f"{r['setting']:<34} {r['mode']:<24} {r['images_per_s']:>8.1f} {r['floor_images_per_s']:>11.1f} "
              f"{r['step_over_floor']:>10.3f} {r.get('speedup_over_eager', 1.0):>8.3f}x {r['peak_memory_mib']:>9.1f} "
              f"{r['first_step_s']:>10.1f}")
    return rows


if __name__ == "__main__":
    main()

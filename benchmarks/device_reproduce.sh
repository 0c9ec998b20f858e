#!/usr/bin/env bash
# The paper's CIFAR-10-LT IF 100 schedule (NCL, 3 x ResNet-32, 400 epochs, the released augmentation, MoCo off) on
# one fresh GPU machine, in one command that stays inside a 10-minute slot (issue 11):
#   1. environment: the wheels of .whl/ (jsonargparse and datasets, when the image lacks them), versions, the GPU;
#   2. smoke run: 2 short epochs with the fastest switch set; if it fails, the next set (SWITCHES, '|'-separated);
#   3. the full run with the switch set that passed, stopped at whatever time is left of BUDGET_S;
#   4. benchmarks/train_step.py on the device for the remaining seconds;
# writing into OUT_DIR: log.txt (everything), summary.json (images/s, epochs, wall time, single and ensemble test
# top-1; device_summary.py), metrics.json (the full run's evaluation), train_step.txt.
#
# Needs the data in .device/cifar10/ and, where jsonargparse or datasets is missing, the wheels in .whl/: run
# `bash benchmarks/device_prepare.sh` on the development machine first, then with the device tool
#   run(command="bash benchmarks/device_reproduce.sh $OUT", carry=[".device", ".whl"], timeout_s=600)
# CPU dry run at tiny scale (no GPU): DEVICE=cpu EPOCHS=1 LIMIT=512 PYTHON=.venv/bin/python \
#   DATA=../shared/data/cifar10 bash benchmarks/device_reproduce.sh /tmp/out
#
# Variables: DEVICE (cuda | cpu), EPOCHS (400), LIMIT (use the first N training / evaluation images), DATA
# (.device/cifar10), PYTHON (python3), WORK (scratch folder, /tmp/ncl_device), SWITCHES, SMOKE_STEPS, BUDGET_S (540
# on cuda), BENCH_S (seconds kept for the step benchmark), BENCH_MODES (none: skip it), WORKERS (decode workers),
# EXTRA (more recipes/train.py options for both runs, e.g. a tiny backbone for a test).
set -uo pipefail
OUT_DIR=${1:?usage: bash benchmarks/device_reproduce.sh OUT_DIR}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
LOG="$OUT_DIR/log.txt"
exec > >(tee -a "$LOG") 2>&1

DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-400}
LIMIT=${LIMIT:-}
DATA=${DATA:-.device/cifar10}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ncl_device}
if [ "$DEVICE" = cuda ]; then
  FAST="--compile true --compile_scope step --compile_mode reduce-overhead --mixed_precision bf16 --channels_last"
  SWITCHES=${SWITCHES:-"$FAST|--compile true --mixed_precision bf16|--compile false"}
  SMOKE_STEPS=${SMOKE_STEPS:-100}; BUDGET_S=${BUDGET_S:-540}; BENCH_S=${BENCH_S:-75}; WORKERS=${WORKERS:-8}
  BENCH_MODES=${BENCH_MODES:-"compiled_step+cg+bf16+cl,compiled"}
  BENCH_ARGS="--steps 20 --warmup 10"
else
  SWITCHES=${SWITCHES:-"--compile false"}
  SMOKE_STEPS=${SMOKE_STEPS:-3}; BUDGET_S=${BUDGET_S:-3600}; BENCH_S=${BENCH_S:-240}; WORKERS=${WORKERS:-2}
  BENCH_MODES=${BENCH_MODES:-"eager"}
  BENCH_ARGS="--steps 2 --warmup 1"
fi
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"  # the smoke run's compilation is reused by the full run

echo "== device_reproduce: $(date -u +%FT%TZ) DEVICE=$DEVICE EPOCHS=$EPOCHS LIMIT=${LIMIT:-none} DATA=$DATA"
# ------------------------------------------------------------------------------------------------ 1. environment
if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client, datasets" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      .whl/*.whl || exit 3
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "jsonargparse or datasets is missing and .whl/ holds no wheels: run benchmarks/device_prepare.sh first"; exit 2
  fi
fi
if [ ! -f "$DATA/train.parquet" ]; then
  echo "no $DATA/train.parquet: run benchmarks/device_prepare.sh first (it copies the parquet into .device/)"; exit 2
fi
"$PY" - "$DEVICE" <<'EOF' || exit 4
import sys
import accelerate, timm, torch
try:
    import datasets
except ImportError as e:
    sys.exit(f"error: datasets does not import ({e}). Run benchmarks/device_prepare.sh and carry .whl/")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, accelerate "
      f"{accelerate.__version__}, datasets {datasets.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("DEVICE=cuda but torch sees no GPU")
    print("gpu:", torch.cuda.get_device_name(0))
EOF
COMMON=(--config recipes/configs/cifar10_lt_if100.yaml --data.dataset "$DATA" --moco.enabled false
        --data.pipeline tensor --data.tensor_cache "$WORK/decoded" --data.num_workers "$WORKERS" --overwrite
        --log_every 200)
[ -n "$LIMIT" ] && COMMON+=(--data.limit_train "$LIMIT" --data.limit_eval "$LIMIT")
# shellcheck disable=SC2206  # EXTRA is a list of words
[ -n "${EXTRA:-}" ] && COMMON+=($EXTRA)

# ------------------------------------------------------------------------------------------------ 2. smoke run
CHOSEN=""
IFS='|' read -r -a SETS <<< "$SWITCHES"
for SW in "${SETS[@]}"; do
  echo "== smoke run ($(elapsed)s): 2 epochs x $SMOKE_STEPS steps, switches: $SW"
  t=$(date +%s)
  # shellcheck disable=SC2086  # the switch set is a list of words
  timeout 300 "$PY" recipes/train.py "${COMMON[@]}" $SW --epochs 2 --max_steps_per_epoch "$SMOKE_STEPS" \
    --output_dir "$WORK/smoke"
  rc=$?
  echo "== smoke run exit $rc after $(( $(date +%s) - t ))s"
  if [ $rc -eq 0 ]; then CHOSEN=$SW; break; fi
done
if [ -z "$CHOSEN" ]; then echo "every switch set failed the smoke run"; exit 5; fi
SMOKE_RATE=$(grep -o '^epoch 2 .*' "$LOG" | tail -1 | grep -o '[0-9.]* img/s' | cut -d' ' -f1)

# ------------------------------------------------------------------------------------------------ 3. the full run
FULL_S=$(( BUDGET_S - $(elapsed) - BENCH_S - 15 ))
echo "== full run ($(elapsed)s): $EPOCHS epochs, switches: $CHOSEN, stopped after ${FULL_S}s at the latest"
t=$(date +%s)
# shellcheck disable=SC2086
timeout "$FULL_S" "$PY" recipes/train.py "${COMMON[@]}" $CHOSEN --epochs "$EPOCHS" --output_dir "$WORK/full"
FULL_RC=$?
FULL_WALL=$(( $(date +%s) - t ))
echo "== full run exit $FULL_RC after ${FULL_WALL}s"
[ -f "$WORK/full/eval/metrics.json" ] && cp "$WORK/full/eval/metrics.json" "$OUT_DIR/metrics.json"

# ------------------------------------------------------------------------------------------------ 4. step benchmark
LEFT=$(( BUDGET_S - $(elapsed) - 10 ))
BENCH_RC=skipped
if [ "$BENCH_MODES" != none ]; then
  echo "== train_step.py --device $DEVICE ($(elapsed)s): modes $BENCH_MODES, ${LEFT}s at most"
  # shellcheck disable=SC2086
  timeout "$(( LEFT > 5 ? LEFT : 5 ))" "$PY" benchmarks/train_step.py --device "$DEVICE" \
    --only resnet32_cifar/b64/nomoco --modes "$BENCH_MODES" $BENCH_ARGS | tee "$OUT_DIR/train_step.txt"
  BENCH_RC=${PIPESTATUS[0]}
fi

"$PY" benchmarks/device_summary.py "$WORK/full" --wall-s "$FULL_WALL" --exit-code "$FULL_RC" \
  --out "$OUT_DIR/summary.json" --extra "device=$DEVICE" "switches=$CHOSEN" "smoke_images_per_s=${SMOKE_RATE:-}" \
  "train_step_exit_code=$BENCH_RC" "script_seconds=$(elapsed)" "limit=${LIMIT:-none}" \
  "commit=$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)"
echo "== done in $(elapsed)s: $OUT_DIR"

#!/usr/bin/env bash
# Prepare the folders benchmarks/device_reproduce.sh needs on a GPU machine that has no network and no `datasets`:
#   .device/cifar10/  the CIFAR-10 parquet files (train, test)
#   .whl/             wheels of the pure-Python packages the GPU image lacks (jsonargparse and its two helpers;
#                     datasets, dill and multiprocess: the image has pyarrow, pandas, fsspec and xxhash), at the
#                     versions this checkout's virtual environment runs
# Both are git-ignored; name them in the device tool's `carry` (64 MiB in all with the working tree).
#
#   bash benchmarks/device_prepare.sh [CIFAR10_DIR]      # default: ../shared/data/cifar10 beside the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/cifar10}
PY=${PYTHON:-.venv/bin/python}

mkdir -p .device/cifar10 .whl
cp -f "$SRC/train.parquet" "$SRC/test.parquet" .device/cifar10/
PKGS=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in
       ('jsonargparse', 'docstring_parser', 'typeshed_client', 'datasets', 'dill', 'multiprocess')))")
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $PKGS
ls -l .device/cifar10 .whl
total=$(du -cm .device .whl $(git ls-files) 2>/dev/null | tail -1 | cut -f1)
echo "carried with the tracked files: about ${total} MiB (limit 64 MiB)"
echo 'device tool: run(command="bash benchmarks/device_reproduce.sh $OUT", carry=[".device", ".whl"], timeout_s=600)'

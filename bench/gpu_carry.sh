#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a GPU machine without internet into .gpu-data/ (git-ignored, about 10 MB):
# mnist.npz, the lenet_mnist domain extractor (trained here once if it is missing: ~1 min on a CPU) and
# torch-fidelity's wheel (pure Python; the preset's final 10k FID imports it). Then, on the GPU machine:
#
#   bash bench/gpu_carry.sh                            # here (needs .venv: make venv)
#   GANCORE_DATA=.gpu-data bash bench/gpu_check.sh     # there, with .gpu-data carried along
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${GANCORE_DATA:-../shared/data}
[ -f "$DATA/mnist.npz" ] || { echo "error: $DATA/mnist.npz not found; set GANCORE_DATA to the folder that holds it" >&2; exit 2; }
CACHE=${GANCORE_CACHE:-$PWD/.cache/gancore}
D=.gpu-data
rm -rf "$D"
mkdir -p "$D/whl" "$D/extractors"
cp "$DATA/mnist.npz" "$D/"
if [ ! -f "$CACHE/extractors/lenet_mnist.pt" ]; then
    GANCORE_DATA="$DATA" GANCORE_CACHE="$CACHE" "$PY" jobs/train_classifier.py --dataset mnist
fi
cp "$CACHE"/extractors/lenet_mnist.* "$D/extractors/"
version=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch-fidelity"))')
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$D/whl" "torch-fidelity==$version"
du -sh "$D"

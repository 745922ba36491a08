#!/usr/bin/env bash
# The fast path's GPU check in one go (issue "Fast path"): the GPU tests, the speed table, K trials per GPU, the
# full 100-epoch MNIST DCGAN preset and batched ensembles. Sized for one 10-minute call on an H100/H200 (each part
# has its own timeout, so a slow part cannot eat the rest); writes logs and JSON under $OUT (default /tmp/gancore-gpu).
# `timeout -k`: a training run takes SIGTERM as "checkpoint and stop", so KILL follows 10 s later.
#
#   GANCORE_DATA=/path/with/mnist.npz bash bench/gpu_check.sh [PART ...]     # default: 1 to 5
#   GANCORE_DATA=/path/with/mnist.npz bash bench/gpu_check.sh 6               # a second call: #17's GPU rows
#
# Parts, most important first (timeouts sum to 555 s): 1 GPU tests (120 s), 2 the 100-epoch preset + final FID
# (150 s), 3 the speed table (150 s), 4 K trials per GPU (90 s), 5 vmapped ensembles (45 s). Part 6 (300 s, its own
# call): the goal preset mnist_dcgan_plus at its full budget. Parts 2 and 6 put their best checkpoints in $OUT as
# sampling-only files (jobs/slim.py, a few MB), so the Inception FID is computed back on a CPU:
#   python jobs/eval.py OUT/mnist_dcgan_plus_best.pt --extractor inception -n 10000
#
# Needs torch (CUDA), accelerate, numpy, scipy, pyyaml, rich, matplotlib, h5py and pytest; tracking is off, so MLflow
# and Optuna are not needed. The device machine of this workplace has all of these in its own python3. Prepare the
# rest here with `bash bench/gpu_carry.sh` (.gpu-data/: mnist.npz, the lenet_mnist extractor for the final FID, the
# torch-fidelity wheel), carry .gpu-data and run `GANCORE_DATA=.gpu-data bash bench/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(1 2 3 4 5)
for p in "${PARTS[@]}"; do
    case $p in [1-6]) ;; *) echo "error: unknown part '$p'; parts are 1-6 (bash bench/gpu_check.sh [PART ...])" >&2; exit 2;; esac
done
OUT=${OUT:-/tmp/gancore-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export GANCORE_CACHE=${GANCORE_CACHE:-/tmp/gancore-cache}
: "${GANCORE_DATA:?set GANCORE_DATA to the folder holding mnist.npz}"
export GANCORE_DATA
if ls "$GANCORE_DATA"/whl/*.whl >/dev/null 2>&1; then  # carried wheels (bench/gpu_carry.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gancore-site \
        "$GANCORE_DATA"/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gancore-site"
fi
if [ -d "$GANCORE_DATA/extractors" ]; then  # the same lenet_mnist as the CPU runs, not one retrained there
    mkdir -p "$GANCORE_CACHE/extractors" && cp "$GANCORE_DATA"/extractors/* "$GANCORE_CACHE/extractors/"
fi

$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

part1() {
    echo "== 1. exactness and capture tests (tests/test_fast_path.py)"
    timeout -k 10 120 $PY -m pytest -q -ra -p no:cacheprovider tests/test_fast_path.py 2>&1 | tee "$OUT/tests.log"
}

part2() {
    echo "== 2. the full preset: 100 epochs of the MNIST DCGAN (93,700 steps), fast path, then a final 10k FID"
    local fid=(eval.n_samples=10000 eval.extractor=lenet_mnist "eval.metrics=[fid]")  # metric: fid_lenet_10k
    $PY -c "import torch_fidelity" 2>/dev/null || { fid=(); echo "no torch-fidelity here (bench/gpu_carry.sh): no FID"; }
    local start=$EPOCHREALTIME rc
    # on timeout the run checkpoints and stops: its last line gives the step it reached
    timeout -k 10 150 $PY jobs/train.py --config configs/mnist_dcgan.yaml train.compile=cudagraph track.enabled=false \
        train.progress=false train.checkpoint_every=10000 "${fid[@]}" --out /tmp/gancore-full > "$OUT/full.log" 2>&1
    rc=$?
    tail -5 "$OUT/full.log"
    $PY -c "import sys; print(f'wall {float(sys.argv[2]) - float(sys.argv[1]):.1f} s, exit {sys.argv[3]}')" \
        "$start" "$EPOCHREALTIME" "$rc" | tee -a "$OUT/full.log"
    $PY jobs/slim.py /tmp/gancore-full "$OUT/mnist_dcgan_best.pt" | tee -a "$OUT/full.log"
}

part6() {
    echo "== 6. #17's GPU row: mnist_dcgan_plus (EMA, domain FID every epoch, best checkpoint kept), full budget"
    local start=$EPOCHREALTIME rc
    timeout -k 10 300 $PY jobs/train.py --config configs/mnist_dcgan_plus.yaml train.compile=cudagraph \
        track.enabled=false train.progress=false train.checkpoint_every=10000 --out /tmp/gancore-plus \
        > "$OUT/plus.log" 2>&1
    rc=$?
    tail -5 "$OUT/plus.log"
    $PY -c "import sys; print(f'wall {float(sys.argv[2]) - float(sys.argv[1]):.1f} s, exit {sys.argv[3]}')" \
        "$start" "$EPOCHREALTIME" "$rc" | tee -a "$OUT/plus.log"
    $PY jobs/slim.py /tmp/gancore-plus "$OUT/mnist_dcgan_plus_best.pt" | tee -a "$OUT/plus.log"
}

part3() {
    echo "== 3. speed: reports' loop vs gancore variants, batch 64 then 256 (rows print as they are measured)"
    timeout -k 10 150 $PY bench/train_speed.py --steps 300 --batch 64 256 --profile --json "$OUT/train_speed.json" \
        --modes eager cudagraph compile_cudagraph cudagraph+bf16 compile 2>&1 | tee "$OUT/train_speed.log"
}

part4() {
    echo "== 4. K trials per GPU (aggregate throughput), recorded for sweeps' workers: auto"
    timeout -k 10 90 $PY bench/trials_per_device.py --k 1 2 4 8 --steps 300 --mode cudagraph --save 2>&1 \
        | tee "$OUT/trials.log"
    cp "$GANCORE_CACHE/trials_per_device.json" "$OUT/" 2>/dev/null
}

part5() {
    echo "== 5. batched ensembles: K DCGANs as one vmapped model vs the same K one after another"
    timeout -k 10 45 $PY bench/ensemble_speed.py --k 1 2 4 8 --steps 50 2>&1 | tee "$OUT/ensemble.log"
}

for p in "${PARTS[@]}"; do "part$p"; done

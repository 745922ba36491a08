#!/bin/bash
# #26: once winner seeds 1 and 2 are trained (winner.sh), the sweep's own confirmation exports and measures them
# (Inception FID 10k vs the test images, first pass), from /work/runs28 (c589b27: --confirm-seeds; they trained at 86480f8), on
# both threads. It would then train winner seed 3: stopped (SIGTERM, exit 75, resumable) as it starts.
cd /work/runs28
export GANCORE_DATA=/work/shared/data GANCORE_CACHE=/work/main/.cache/gancore MPLBACKEND=Agg PYTHONPATH=/work/runs28 OMP_NUM_THREADS=2
export MLFLOW_TRACKING_URI=sqlite:////work/runs26/mlruns/mlflow.db
/work/main/.venv/bin/python jobs/sweep.py sweeps/mnist_budget.yaml --confirm --confirm-runs ${RUNS:-winner} --confirm-seeds ${SEEDS:-1,2} --out /work/runs26/runs/sweeps > /work/logs/measure_${RUNS:-winner}.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  if grep -q "(seed 3): training" /work/logs/measure_${RUNS:-winner}.log; then kill -TERM $pid; fi
  sleep 5
done
wait $pid; echo "exit $?" >> /work/logs/measure_${RUNS:-winner}.log

#!/bin/bash
# the #26 budget sweep, from the worktree at a fixed commit; resumable: run again to continue. One MLflow store and
# one sweep dir for the sweep and its confirmation: /work/runs26 (where the baseline trains)
cd /work/runs26b
export GANCORE_DATA=/work/shared/data GANCORE_CACHE=/work/main/.cache/gancore MPLBACKEND=Agg PYTHONPATH=/work/runs26b OMP_NUM_THREADS=1
export MLFLOW_TRACKING_URI=sqlite:////work/runs26/mlruns/mlflow.db
exec nice -n 5 taskset -c 1 /work/main/.venv/bin/python jobs/sweep.py sweeps/mnist_budget.yaml --out /work/runs26/runs/sweeps

#!/bin/bash
# #26: the budget sweep's winner (trial 21) at the full budget on fresh seed $1, trained exactly as
# `jobs/sweep.py sweeps/mnist_budget.yaml --confirm` plans it (same config, same run dir, same MLflow store), so
# the confirm run that follows finds it finished and only exports and measures it. From /work/runs27 (86480f8).
# Resumable: run again to continue (--resume auto).
cd /work/runs27
export GANCORE_DATA=/work/shared/data GANCORE_CACHE=/work/main/.cache/gancore MPLBACKEND=Agg PYTHONPATH=/work/runs27 OMP_NUM_THREADS=1
export MLFLOW_TRACKING_URI=sqlite:////work/runs26/mlruns/mlflow.db
seed=$1
exec nice -n 5 taskset -c $2 /work/main/.venv/bin/python - "$seed" <<'PY'
import sys
from gancore.sweep import load_sweep
from gancore.sweep.confirm import plans
from gancore.sweep.report import best_trial
from gancore.sweep.storage import open_storage, open_study
from gancore.train.loop import fit
seed = int(sys.argv[1])
sweep = load_sweep("sweeps/mnist_budget.yaml", out="/work/runs26/runs/sweeps")
best = best_trial(open_study(sweep, open_storage(sweep.storage_url)))
assert best.number == 21, best.number
p = next(p for p in plans(sweep, best.params) if p.preset == "winner" and p.cfg.train.seed == seed)
print(p.label, p.run_dir, p.steps, "steps", flush=True)
r = fit(p.cfg, out=p.run_dir, resume="auto", tags={"gancore.confirm": sweep.study, "optuna.trial": str(best.number)})
print("status", r.status, flush=True)
PY

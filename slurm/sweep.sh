#!/usr/bin/env bash
# Workers of an Optuna sweep as a Slurm job array: every array task pulls trials from the shared study until the
# study's budget (n_trials) is used, so more tasks = more trials in parallel.
#
#   python jobs/sweep.py sweeps/mnist_dcgan.yaml --storage postgresql://USER:PASS@DBHOST/optuna --prepare
#   mkdir -p logs && sbatch --array=0-7 slurm/sweep.sh sweeps/mnist_dcgan.yaml --storage postgresql://...
#   python jobs/sweep.py sweeps/mnist_dcgan.yaml --storage postgresql://... --report     # table, best.yaml, figures
#
# Python equivalent (prepare + a job array through submitit + wait + report in one command):
#   python jobs/sweep.py sweeps/mnist_dcgan.yaml --launcher slurm --workers 8 --storage postgresql://...
#
# Everything after the script name goes to `jobs/sweep.py ... --worker`. --prepare first: it creates the study and
# the parent MLflow run once and trains/caches the FID extractor's statistics (workers would race for them).
#
# Storage: tasks on several nodes meet only in the study's storage. Use PostgreSQL/MySQL (Optuna heartbeats: a task
# killed without warning has its trial failed and re-queued after the sweep file's grace_period) or
# `journal:/shared/dir/study.log` (Optuna's journal file, fine on NFS; no heartbeat). Not SQLite: its locking is
# unreliable on network file systems, so jobs/sweep.py refuses it inside Slurm jobs.
#
# Stop and requeue (as slurm/train.sh): Slurm sends SIGUSR1 to this shell 120 s before the time limit and at
# preemption; the trap forwards it to the worker; the trainer checkpoints, the worker re-queues its trial in the
# study (any worker resumes it from that checkpoint, in the same MLflow run) and exits 75; this script then
# requeues the job. A hard kill leaves the trial RUNNING until its heartbeat goes stale (RDB storage).
#
# Resource defaults: the --time/--nodes/--cpus-per-task/--mem lines mirror gancore/cluster/resources.py (Resources),
# as the sweep file's `slurm:` section does; tests/test_launch_local.py checks that they agree. A worker that reaches
# the time limit checkpoints and requeues like any other stop. Options on the sbatch command line win over them.
#
#SBATCH --job-name=gancore-sweep
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --time=4:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
## one GPU per worker (a worker trains one trial at a time):
##SBATCH --gpus=1

set -uo pipefail
SCRIPT=sweep.sh

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: submit this with sbatch --array=0-N slurm/sweep.sh SWEEP.yaml --storage URL, or use" \
         "python jobs/sweep.py SWEEP.yaml [--launcher slurm]" >&2
    exit 2
fi
ROOT="${GANCORE_ROOT:-$SLURM_SUBMIT_DIR}"  # sbatch runs a spooled copy: find the checkout from the submit dir
if [[ ! -f $ROOT/jobs/sweep.py || ! -f $ROOT/slurm/common.sh ]]; then
    echo "error: $ROOT/jobs/sweep.py not found; submit from the gancore checkout or set GANCORE_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"  # EXIT_STOPPED (the worker's exit after a signal: trial re-queued), PYTHON, ...

log "job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0} (restart ${SLURM_RESTART_COUNT:-0})" \
    "on $(hostname -s): $PYTHON $ROOT/jobs/sweep.py $* --worker"

run_forwarding "the worker (it checkpoints, re-queues its trial, exits $EXIT_STOPPED)" \
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" "$ROOT/jobs/sweep.py" "$@" --worker

# Requeue after a checkpointed stop on the time-limit/preemption warning; not after SIGTERM (scancel).
if ((rc == EXIT_STOPPED)) && [[ $signalled != TERM ]]; then
    log "worker stopped (exit $rc${signalled:+ after SIG$signalled}); requeueing job $SLURM_JOB_ID"
    requeue_job
fi
exit "$rc"

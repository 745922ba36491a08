#!/usr/bin/env bash
# One gancore training run as a Slurm batch job, checkpointed and requeued on preemption / time limit.
#
#   mkdir -p logs && sbatch slurm/train.sh --config configs/quickstart.yaml optim.lr_g=1e-4 [--out DIR]
#   sbatch -p gpu -A myacct --gpus-per-node=4 --ntasks-per-node=4 --cpus-per-task=8 slurm/train.sh --config ...
#
# Everything after the script name goes to jobs/train.py unchanged. The run dir is runs/slurm-$SLURM_JOB_ID unless
# --out is given, and --resume auto is always added, so a requeued job continues from its latest checkpoint (and
# the same MLflow run). --resume is therefore not accepted here.
#
# Launch: one Slurm task per training process (`srun`), so Slurm forwards signals to every rank and srun returns
# the ranks' exit code. A multi-process run (--ntasks-per-node=GPUS, any --nodes) gets the torch.distributed
# variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = first node, MASTER_PORT from the job id) that Accelerate
# reads; `accelerate launch` is not used because its torchrun agent dies on SIGUSR1 and hides exit code 75.
#
# Stop and requeue: Slurm sends SIGUSR1 to this shell 120 s before the time limit and at preemption
# (--signal=B:USR1@120). The trap forwards it to the training step; the trainer finishes its step, writes a
# checkpoint and exits 75; then this script runs `scontrol requeue`. SIGTERM (scancel, the hard end of the time
# limit or of a preemption's grace time) is forwarded too, so a checkpoint is written, but it never requeues: that
# would bring a cancelled job back. Python equivalent: jobs/submit.py (gancore/cluster/).
#
# Resource defaults: the --time/--nodes/--cpus-per-task/--mem lines mirror gancore/cluster/resources.py (Resources);
# tests/test_launch_local.py checks that they agree. Options on the sbatch command line win over them.
#
#SBATCH --job-name=gancore
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --time=4:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
## GPUs: one task per GPU, e.g. on the sbatch command line: --gpus-per-node=4 --ntasks-per-node=4
##SBATCH --gpus-per-node=1

set -uo pipefail
SCRIPT=train.sh

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: run this with sbatch (sbatch slurm/train.sh --config ...), or use python jobs/train.py directly" >&2
    exit 2
fi
for arg in "$@"; do
    if [[ $arg == --resume || $arg == --resume=* ]]; then
        echo "error: slurm/train.sh always passes --resume auto; give --out RUN_DIR to continue an earlier run" >&2
        exit 2
    fi
done

# sbatch runs a spooled copy of this file, so the checkout is found from the submit dir (or $GANCORE_ROOT).
ROOT="${GANCORE_ROOT:-$SLURM_SUBMIT_DIR}"
if [[ ! -f $ROOT/jobs/train.py || ! -f $ROOT/slurm/common.sh ]]; then
    echo "error: $ROOT/jobs/train.py not found; submit from the gancore checkout or set GANCORE_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"  # EXIT_STOPPED, PYTHON, log, run_forwarding, requeue_job

extra=()
has_out=0
for arg in "$@"; do [[ $arg == --out || $arg == --out=* ]] && has_out=1; done
run_dir="runs/slurm-$SLURM_JOB_ID"
if ((has_out)); then run_dir="(your --out)"; else extra+=(--out "$run_dir"); fi
extra+=(--resume auto)

# torch.distributed rendezvous for several tasks: MASTER_ADDR, MASTER_PORT, WORLD_SIZE and LOCAL_WORLD_SIZE come from
# gancore/cluster/rendezvous.py (the rule the submitit job uses too); each task sets its own RANK/LOCAL_RANK below.
ntasks="${SLURM_NTASKS:-1}"
if ((ntasks > 1)); then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if ! rendezvous="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m gancore.cluster.rendezvous \
            --job-id "$SLURM_JOB_ID" --tasks "$ntasks" --nodes "${SLURM_NNODES:-1}" "${hosts[@]}")"; then
        echo "error: $PYTHON -m gancore.cluster.rendezvous failed (see above); check GANCORE_PYTHON" >&2
        exit 2
    fi
    eval "$rendezvous"  # export MASTER_ADDR=... MASTER_PORT=... WORLD_SIZE=... LOCAL_WORLD_SIZE=...
    # shellcheck disable=SC2016  # expanded per task by the inner bash, not here
    per_task=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' gancore-task)
else
    per_task=()
fi

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $ntasks task(s)," \
    "$PYTHON $ROOT/jobs/train.py $* ${extra[*]}"

# SIGUSR1 (warned): Slurm's warning before the time limit / at preemption -> requeue after the checkpoint.
# SIGTERM (terminated): scancel or the hard end -> checkpoint, but never requeue (that would undo a scancel).
# srun >= 22.05 does not inherit --cpus-per-task from sbatch: pass it on.
run_forwarding "the training step (it checkpoints and exits $EXIT_STOPPED)" \
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "${per_task[@]}" "$PYTHON" "$ROOT/jobs/train.py" "$@" "${extra[@]}"

# Requeue after the warning signal once the trainer stopped with a checkpoint (75), or when the signal ended the
# step before the trainer could catch it (still importing): --resume auto then continues from the last periodic
# checkpoint. Not after SIGTERM: `scontrol requeue` would bring a cancelled job back (preemption requeues by itself).
if ((terminated)); then
    ((rc == EXIT_STOPPED)) && log "stopped on SIGTERM with a checkpoint; not requeued (cancelled or out" \
        "of time). Continue by submitting the same arguments with --out $run_dir"
elif ((rc == EXIT_STOPPED || (warned && rc != 0))); then
    log "step ended with exit code $rc; requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
    requeue_job
fi
exit "$rc"

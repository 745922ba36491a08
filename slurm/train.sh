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
# would bring a cancelled job back. Python equivalent: jobs/submit.py (gancore/launch.py).
#
#SBATCH --job-name=gancore
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
## GPUs: one task per GPU, e.g. on the sbatch command line: --gpus-per-node=4 --ntasks-per-node=4
##SBATCH --gpus-per-node=1

set -uo pipefail

EXIT_STOPPED=75  # jobs/train.py: stopped by a signal after writing a checkpoint

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
if [[ ! -f $ROOT/jobs/train.py ]]; then
    echo "error: $ROOT/jobs/train.py not found; submit from the gancore checkout or set GANCORE_ROOT" >&2
    exit 2
fi
PYTHON="${GANCORE_PYTHON:-}"
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

extra=()
has_out=0
for arg in "$@"; do [[ $arg == --out || $arg == --out=* ]] && has_out=1; done
run_dir="runs/slurm-$SLURM_JOB_ID"
if ((has_out)); then run_dir="(your --out)"; else extra+=(--out "$run_dir"); fi
extra+=(--resume auto)

# torch.distributed rendezvous for several tasks; each task sets its own RANK/LOCAL_RANK below.
ntasks="${SLURM_NTASKS:-1}"
if ((ntasks > 1)); then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT WORLD_SIZE="$ntasks" LOCAL_WORLD_SIZE=$((ntasks / ${SLURM_NNODES:-1}))
    # shellcheck disable=SC2016  # expanded per task by the inner bash, not here
    per_task=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' gancore-task)
else
    per_task=()
fi

echo "train.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $ntasks task(s)," \
     "$PYTHON $ROOT/jobs/train.py $* ${extra[*]}"

child=""
trapped=0
warned=0      # SIGUSR1: Slurm's warning before the time limit / at preemption -> requeue after the checkpoint
terminated=0  # SIGTERM: scancel or the hard end -> checkpoint, but never requeue (that would undo a scancel)
forward() {  # $1: signal name
    trapped=1
    [[ $1 == USR1 ]] && warned=1
    [[ $1 == TERM ]] && terminated=1
    echo "train.sh: got SIG$1; forwarding to the training step (it checkpoints and exits $EXIT_STOPPED)"
    [[ -n $child ]] && kill -s "$1" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# srun >= 22.05 does not inherit --cpus-per-task from sbatch: pass it on.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "${per_task[@]}" "$PYTHON" "$ROOT/jobs/train.py" "$@" "${extra[@]}" &
child=$!

# `wait` returns early (>128) when a trapped signal arrives; wait again until the step has really ended.
while :; do
    trapped=0
    wait "$child"
    rc=$?
    ((trapped)) && kill -0 "$child" 2>/dev/null && continue
    if ((trapped)); then  # signal and exit crossed: the exit status is still waitable
        wait "$child" 2>/dev/null
        r=$?
        ((r != 127)) && rc=$r
    fi
    break
done

# Requeue after the warning signal once the trainer stopped with a checkpoint (75), or when the signal ended the
# step before the trainer could catch it (still importing): --resume auto then continues from the last periodic
# checkpoint. Not after SIGTERM: `scontrol requeue` would bring a cancelled job back (preemption requeues by itself).
if ((terminated)); then
    ((rc == EXIT_STOPPED)) && echo "train.sh: stopped on SIGTERM with a checkpoint; not requeued (cancelled or out" \
        "of time). Continue by submitting the same arguments with --out $run_dir"
elif ((rc == EXIT_STOPPED || (warned && rc != 0))); then
    echo "train.sh: step ended with exit code $rc; requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
    scontrol requeue "$SLURM_JOB_ID" || echo "train.sh: scontrol requeue failed"
fi
exit "$rc"

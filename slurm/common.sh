# shellcheck shell=bash
# What slurm/train.sh and slurm/sweep.sh share. Not run by itself: each batch script sources it once it found the
# checkout, because sbatch runs a spooled copy of the batch script (/var/spool/slurmd/job<ID>/slurm_script), so the
# script's own path does not lead back here:
#
#   SCRIPT=train.sh                                 # the name its log lines start with
#   ROOT="${GANCORE_ROOT:-$SLURM_SUBMIT_DIR}"       # the checkout: $GANCORE_ROOT, else the directory sbatch ran in
#   source "$ROOT/slurm/common.sh"
#
# Defines EXIT_STOPPED, PYTHON, log, run_forwarding and requeue_job.

EXIT_STOPPED=75  # mirrors gancore/errors.py EXIT_STOPPED: stopped by a signal after writing a checkpoint

# The interpreter: $GANCORE_PYTHON, else the checkout's .venv, else python3 from PATH.
PYTHON="${GANCORE_PYTHON:-}"
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

log() { echo "$SCRIPT: $*"; }

# run_forwarding NOTE CMD...: run CMD (the job step, usually `srun ...`) in the background, forward SIGUSR1 and
# SIGTERM to it, and wait until it has really ended. NOTE names what receives the signal and what it does then.
# Sets: rc (the step's exit status), signalled (the last signal's name), warned=1 after SIGUSR1 (Slurm's warning
# before the time limit / at preemption), terminated=1 after SIGTERM (scancel, the hard end of a limit).
run_forwarding() {
    _forward_to=$1
    shift
    child=""
    signalled=""
    warned=0
    terminated=0
    trap '_forward USR1' USR1
    trap '_forward TERM' TERM
    "$@" &
    child=$!
    # `wait` returns early (>128) when a trapped signal arrives; wait again until the step has really ended.
    while :; do
        trapped=0
        wait "$child"
        rc=$?
        ((trapped)) && kill -0 "$child" 2>/dev/null && continue
        if ((trapped)); then  # signal and exit crossed: the exit status is still waitable
            wait "$child" 2>/dev/null
            local r=$?
            ((r != 127)) && rc=$r
        fi
        break
    done
}

_forward() {  # $1: signal name
    trapped=1
    signalled=$1
    [[ $1 == USR1 ]] && warned=1
    [[ $1 == TERM ]] && terminated=1
    log "got SIG$1; forwarding to $_forward_to"
    [[ -n $child ]] && kill -s "$1" "$child" 2>/dev/null
}

# Put this job back in the queue: it starts again with the same arguments (and resumes from its checkpoint).
requeue_job() {
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (already requeued or cancelled?)"
}

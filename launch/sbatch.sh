#!/usr/bin/env bash
# Slurm batch script: one task per GPU with srun, a final checkpoint boundary before the time
# limit, and a requeue that continues the same run.
#
#   sbatch [sbatch options] launch/sbatch.sh RUN_DIR [WORKLOAD [ARGS...]]
#
#   RUN_DIR    the run directory, on a filesystem every node sees (or pass the workload
#              --storage local --local-dir /node/local/disk: then only rank 0 writes RUN_DIR).
#   WORKLOAD   a Python script or `-m module`, then its arguments (default: -m dist_hooks.demo).
#              RUN_DIR is passed to it as `--out RUN_DIR` (see RUN_ARG) and as $DIST_HOOKS_RUN_DIR.
#
# Submit from the repository (Slurm runs a copy of this script, so the repository is found
# through $SLURM_SUBMIT_DIR, or set DIST_HOOKS_ROOT). Edit the #SBATCH lines or override them
# on the command line, e.g. `sbatch -N 4 --time=12:00:00 launch/sbatch.sh /lustre/me/runs/x`.
#
# How the end of the allocation is handled:
#   1. --signal=B:USR1@300 makes Slurm send SIGUSR1 to this script 300 s before the time limit.
#   2. The trap forwards it to srun, which forwards it to every task. dist_hooks' Run turns the
#      next checkpoint boundary into the last one: every rank commits, closes its files and exits
#      with status 143. (Choose the workload's checkpoint interval so that a boundary falls within
#      the 300 s.)
#   3. This script then runs `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue with
#      the same job id and, when it starts again (SLURM_RESTART_COUNT + 1), the workload finds
#      RUN_DIR/run.json and resumes from that boundary: nothing recorded before it is lost,
#      nothing after it is duplicated.
#   A node failure requeues the job too (--requeue); the run then resumes from its last regular
#   boundary. A plain `scancel` (SIGTERM) stops the run at its next boundary and is not requeued.
#
# Environment (all optional):
#   PYTHON         interpreter (default: DIST_HOOKS_ROOT/.venv/bin/python, else python3)
#   RUN_ARG        the option that hands RUN_DIR to the workload (default --out; set it empty to
#                  pass nothing)
#   MASTER_ADDR, MASTER_PORT  rendezvous of the torch process group (default: the first node of
#                  the job, and a port derived from the job id and restart count)
#   MAX_REQUEUES   stop requeueing after this many restarts (default 20)
#   SRUN_ARGS      extra srun options, word-split (e.g. "--cpu-bind=cores")
#
#SBATCH --job-name=dist_hooks
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,/^#SBATCH --job-name/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "sbatch.sh: not inside a Slurm job (no SLURM_JOB_ID); submit it with sbatch" >&2
  exit 2
fi

root="${DIST_HOOKS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"
dh_parse_args "$@"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# Rendezvous of the torch process group: task 0 runs on the first node of the job and hosts the
# store there. The port is derived from the job id and the restart count, so that a requeued job
# never meets a socket its previous incarnation left in TIME_WAIT.
restarts="${SLURM_RESTART_COUNT:-0}"
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" | sed -n 1p)"
fi
jobnum="${SLURM_JOB_ID//[!0-9]/}"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$(( 20000 + (10#${jobnum:-0} * 7 + restarts * 1009) % 20000 ))}"


requeue=0
srun_pid=""
on_usr1() {
  echo "[sbatch.sh] $(date '+%F %T') time limit near: final checkpoint boundary, then requeue" >&2
  requeue=1
  [ -z "$srun_pid" ] || kill -USR1 "$srun_pid" 2>/dev/null || true
}
on_term() {
  echo "[sbatch.sh] $(date '+%F %T') SIGTERM: stopping at the next checkpoint boundary" >&2
  [ -z "$srun_pid" ] || kill -TERM "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1
trap on_term TERM

echo "[sbatch.sh] job $SLURM_JOB_ID (restart $restarts): ${SLURM_NTASKS:-?} task(s) on" \
     "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-?}} node(s), rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "run directory $run_dir" >&2

# shellcheck disable=SC2206  # word splitting of SRUN_ARGS is intended
srun_opts=(--kill-on-bad-exit=1 --export=ALL ${SRUN_ARGS:-})
srun "${srun_opts[@]}" "$python" -u "${workload[@]}" "${run_arg[@]}" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
rc=0
wait "$srun_pid" || rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do
  rc=0
  wait "$srun_pid" || rc=$?
done
echo "[sbatch.sh] srun exited with status $rc" >&2

if [ "$requeue" = 1 ] && [ "$rc" != 0 ]; then
  if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
    echo "[sbatch.sh] not requeueing: $restarts restarts already (MAX_REQUEUES=${MAX_REQUEUES:-20})" >&2
    exit "$rc"
  fi
  echo "[sbatch.sh] requeueing job $SLURM_JOB_ID; it resumes $run_dir from its last boundary" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"

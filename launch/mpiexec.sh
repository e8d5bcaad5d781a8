#!/usr/bin/env bash
# Run a dist_hooks workload under mpiexec (MPICH/Hydra, Intel MPI or Open MPI).
#
#   launch/mpiexec.sh RUN_DIR [WORKLOAD [ARGS...]]
#
#   RUN_DIR    the run directory. It is created; a run already in it is continued from its last
#              checkpoint boundary (the workload's Run(resume="auto"), the demo's --resume auto).
#   WORKLOAD   a Python script or `-m module`, then its arguments (default: -m dist_hooks.demo).
#              RUN_DIR is passed to it as `--out RUN_DIR` (see RUN_ARG) and as $DIST_HOOKS_RUN_DIR.
#
# Every rank runs `python -m mpi4py WORKLOAD`: an uncaught exception on one rank then aborts the
# whole job (MPI_Abort) instead of leaving the others waiting. Ranks find their place from
# PMI_RANK/PMI_SIZE (MPICH) or OMPI_COMM_WORLD_* (Open MPI); dist_hooks' collectives go over
# mpi4py, and a torch process group, when the workload wants one, is set up by rank 0 choosing a
# port and broadcasting it over MPI.
#
#   NPROC=4 launch/mpiexec.sh runs/x -m dist_hooks.demo --steps 400
#   NPROC=16 MPIEXEC_ARGS="-f hosts.txt -ppn 8" launch/mpiexec.sh /shared/runs/x my_sim.py
#
# Environment (all optional):
#   NPROC          number of processes (default 2)
#   MPIEXEC        the mpiexec to use (default: the one next to PYTHON, else the one on PATH)
#   MPIEXEC_ARGS   extra mpiexec options, word-split (hosts, processes per node, binding). Open MPI
#                  copies only exported variables to other hosts: add "-x PYTHONPATH -x ..." there.
#   RUN_ARG        the option that hands RUN_DIR to the workload (default --out; set it empty to
#                  pass nothing and let the workload read $DIST_HOOKS_RUN_DIR)
#   PYTHON         interpreter (default: the repository's .venv, else python3)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"
dh_parse_args "$@"
mpiexec="${MPIEXEC:-}"
if [ -z "$mpiexec" ]; then
  pydir="$(dirname "$(command -v "$python")")"
  if [ -x "$pydir/mpiexec" ]; then mpiexec="$pydir/mpiexec"
  elif command -v mpiexec >/dev/null 2>&1; then mpiexec="$(command -v mpiexec)"
  else
    echo "mpiexec.sh: no mpiexec next to $python or on PATH (pip install mpich mpi4py, or load your MPI module)" >&2
    exit 2
  fi
fi

flags=()
if "$mpiexec" --version 2>/dev/null | grep -q -e "Open MPI" -e "OpenRTE"; then
  flags+=(--oversubscribe)                      # more ranks than cores is fine for tests and CPUs
  [ "$(id -u)" != "0" ] || flags+=(--allow-run-as-root)
fi
# shellcheck disable=SC2206  # word splitting of MPIEXEC_ARGS is intended
flags+=(${MPIEXEC_ARGS:-})



nproc="${NPROC:-2}"
echo "[mpiexec.sh] $nproc process(es) with $mpiexec, run directory $run_dir" >&2
exec "$mpiexec" "${flags[@]}" -n "$nproc" "$python" -m mpi4py "${workload[@]}" "${run_arg[@]}"

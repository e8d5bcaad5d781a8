#!/usr/bin/env bash
# Run a dist_hooks workload under torchrun: on one node, or on several joined by a c10d rendezvous.
#
#   launch/torchrun.sh RUN_DIR [WORKLOAD [ARGS...]]
#
#   RUN_DIR    the run directory. It is created; a run already in it is continued from its last
#              checkpoint boundary (the workload's Run(resume="auto"), the demo's --resume auto).
#   WORKLOAD   a Python script or `-m module`, then its arguments (default: -m dist_hooks.demo).
#              RUN_DIR is passed to it as `--out RUN_DIR` (see RUN_ARG) and as $DIST_HOOKS_RUN_DIR.
#
# One node (a free local port, nothing to configure):
#   NPROC=4 launch/torchrun.sh runs/x -m dist_hooks.demo --steps 400
# Several nodes: run the same command on every node, with the same NNODES, RDZV_ENDPOINT, RDZV_ID:
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 launch/torchrun.sh /shared/runs/x ...
#
# Environment (all optional):
#   NPROC          processes on this node (default: the visible GPUs, else 1)
#   NNODES         number of nodes (default 1: --standalone)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous store; required when NNODES > 1. The node
#                  whose address this is hosts the store (see RDZV_IS_HOST).
#   RDZV_ID        rendezvous id, the same on every node (default: $SLURM_JOB_ID, else dist_hooks)
#   NODE_RANK      passed as --node-rank (only the static rendezvous honours it; with c10d the
#                  nodes are ranked in the order they join, which is fine: only global rank 0 is
#                  special, and it needs nothing node-local)
#   LOCAL_ADDR     this node's address as the other nodes reach it (--local-addr; default: its
#                  hostname). Set it on hosts with several networks.
#   RDZV_IS_HOST   1/0: this node hosts the rendezvous store, or not. Default: decided from
#                  LOCAL_ADDR == the endpoint's host when LOCAL_ADDR is set, else torchrun guesses
#                  from the hostname (which fails when the endpoint is an address of a secondary
#                  network).
#   MAX_RESTARTS   times torchrun restarts all workers after a failure (default 0); each restart
#                  resumes the run from its last boundary.
#   MONITOR_INTERVAL  seconds between torchrun's checks of its workers (default 0.2)
#   RUN_ARG        the option that hands RUN_DIR to the workload (default --out; set it empty to
#                  pass nothing and let the workload read $DIST_HOOKS_RUN_DIR)
#   PYTHON         interpreter (default: the repository's .venv, else python3)
#   TORCHRUN_ARGS  extra torchrun options, word-split (e.g. "--rdzv-conf=join_timeout=900")
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"
dh_parse_args "$@"

if [ -z "${NPROC:-}" ]; then
  NPROC=1
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a _gpus <<< "$CUDA_VISIBLE_DEVICES"; NPROC=${#_gpus[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    _n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; [ "${_n:-0}" -gt 0 ] && NPROC="$_n"
  fi
fi
nnodes="${NNODES:-1}"


targs=(--nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}"
       --monitor-interval="${MONITOR_INTERVAL:-0.2}")
if [ "$nnodes" = "1" ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  targs+=(--standalone --nnodes=1)
else
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "torchrun.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (reachable from every node)" >&2
    exit 2
  fi
  targs+=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
          --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-dist_hooks}}")
  [ -z "${NODE_RANK:-}" ] || targs+=(--node-rank="$NODE_RANK")
  [ -z "${LOCAL_ADDR:-}" ] || targs+=(--local-addr="$LOCAL_ADDR")
  is_host="${RDZV_IS_HOST:-}"
  if [ -z "$is_host" ] && [ -n "${LOCAL_ADDR:-}" ]; then
    if [ "${RDZV_ENDPOINT%:*}" = "$LOCAL_ADDR" ]; then is_host=1; else is_host=0; fi
  fi
  case "$is_host" in
    1|true|yes) targs+=(--rdzv-conf=is_host=true) ;;
    0|false|no) targs+=(--rdzv-conf=is_host=false) ;;
  esac
fi
# shellcheck disable=SC2206  # word splitting of TORCHRUN_ARGS is intended
targs+=(${TORCHRUN_ARGS:-})


echo "[torchrun.sh] $nnodes node(s) x $NPROC process(es), run directory $run_dir" >&2
exec "$python" -m torch.distributed.run "${targs[@]}" "${workload[@]}" "${run_arg[@]}"

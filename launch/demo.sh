#!/usr/bin/env bash
# Set up .venv, then run the demo workload on 2 ranks under torchrun (gloo on CPU, NCCL on GPU),
# recording into a run directory on local disk (default runs/demo; override with OUT=...).
# Extra arguments go to the demo (python -m dist_hooks.demo --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
out="${OUT:-$root/runs/demo}"
nproc="${NPROC:-2}"
"$root/.venv/bin/torchrun" --standalone --nproc-per-node "$nproc" -m dist_hooks.demo --out "$out" "$@"

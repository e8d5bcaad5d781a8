#!/usr/bin/env bash
# Set up .venv, then run the whole test suite (multi-process tests start real torchrun/mpiexec jobs).
# pytest exits 5 when it collected no test; that is a failure here, as it is any non-zero status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"

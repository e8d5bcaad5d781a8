#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install dist_hooks into it.
#
# Why a script: an unpinned `torch` resolves to a multi-GB CUDA build on CPU machines, so a fresh
# environment gets the CPU-installable pins in constraints/cpu.txt, while an environment that already
# has a torch (a GPU user's own build, e.g. VENV=/path/to/env or a venv made with
# --system-site-packages) keeps that torch untouched (constraints/no-torch.txt).
# Idempotent: a stamp of the inputs skips pip when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
extras="${EXTRAS:-mpi,test}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dist_hooks needs Python >= 3.11")'
  echo "[setup] creating $venv" >&2
  "$py" -m venv "$venv"
fi
if "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  cons="$root/constraints/no-torch.txt"
else
  cons="$root/constraints/cpu.txt"
fi
stamp="$venv/.dist_hooks_stamp"
want="$(cat "$root/pyproject.toml" "$root"/constraints/*.txt | cksum) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dist_hooks[$extras] into $venv (constraints: ${cons#$root/})" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$cons" -e "$root[$extras]"
  echo "$want" > "$stamp"
fi

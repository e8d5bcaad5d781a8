#!/usr/bin/env bash
# How tests/data/v1_killed_run.tar.gz and its expected digests were made (run once, beside the
# code of commit 8a61768, format v1; kept to document the fixture, not run by the suite).
#   SRC=checkout-of-8a61768 PY=.venv/bin/python bash tests/data/make_v1_fixture.sh OUTDIR
set -euo pipefail
src="${SRC:?checkout of the code that records the fixture}"; py="${PY:-python3}"; out="${1:?}"
here="$(cd "$(dirname "$0")" && pwd)"
demo=(--steps 160 --relax-steps 110 --systems-per-rank 6 --min-atoms 8 --max-atoms 20
      --checkpoint-every 25 --snapshot-every 10 --quiet)
export PYTHONPATH="$src" OMP_NUM_THREADS=1
mkdir -p "$out"; cd "$out"; rm -rf run resumed killed
exec 3>&1 1>&2  # progress to stderr; the digests alone to stdout
# rank 1 SIGKILLs itself before step 130: boundaries up to step 125 are committed, the rest is not
"$py" -m torch.distributed.run --standalone --nproc-per-node=2 --monitor-interval=20 \
  "$src/tests/mp/demo_entry.py" --out run "${demo[@]}" --timeout 6 --fail-at-step 130 --fail-rank 1 || true
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -czf v1_killed_run.tar.gz run
cp -a run killed; cp -a run resumed
"$py" -m dist_hooks.cli verify --json killed > verify.json || true
"$py" -m dist_hooks.cli consolidate killed --progress never
"$py" -m torch.distributed.run --standalone --nproc-per-node=2 "$src/tests/mp/demo_entry.py" \
  --out resumed "${demo[@]}" --timeout 90
"$py" -m dist_hooks.cli consolidate resumed --progress never
"$py" - "$here" >&3 <<'PY'
import json, sys
sys.path.insert(0, sys.argv[1] + "/../support")
from run_digest import tree_digest
report = json.load(open("verify.json"))
print(json.dumps({"verify": {"ok": report["ok"], "checked": report["checked"]},
                  "killed_consolidated": tree_digest("killed/consolidated"),
                  "resumed_run": tree_digest("resumed"),
                  }, indent=1, sort_keys=True))
PY

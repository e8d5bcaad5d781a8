"""Cost of a checkpoint boundary versus the number of processes and the data volume (CPU, gloo-free).

Each rank records a synthetic batch (LoggingHook every step, SnapshotHook every step, converged
records) between boundaries and then commits a boundary; the script reports, per (ranks, volume),
the median over boundaries of: ``sync`` (rank 0's flush + fsync of its own files), ``exchange`` (gather
of commit records + broadcast: metadata-sized), ``stall`` (what the simulation thread waits in all),
``merge`` (rank 0's background merge of new converged records + atomic manifest + consolidated
metadata, which the simulation does not wait for) and the commit record size.

    python benchmarks/bench_boundary.py                    # 1, 2, 4, 8 processes x small, large
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from batches import Ctx, make_batch, perturb
    from dist_hooks import Run

    run = Run(args.out, checkpoint_every=None, timeout=120, handle_signals=False)
    hooks = [run.logging_hook(), run.snapshot_hook(), run.converged_hook()]
    counts = [args.atoms] * args.systems
    b = make_batch(counts, seed=run.rank, first_id=run.rank * args.systems)
    timings, step = [], 0
    for k in range(args.boundaries):
        for _ in range(args.steps):
            mask = torch.zeros(args.systems, dtype=torch.bool)
            mask[: (k * args.steps + _) % args.systems] = True
            ctx = Ctx(b, step_count=step, converged_mask=mask)
            for h in hooks:
                h(ctx, h.stage)
            perturb(b, step)
            step += 1
        run._next_step = step
        run.checkpoint(step)
        run.coordinator.join()  # measure the background merge too (a real run would not wait here)
        timings.append({**run.last_timing, "coordinate_s": run.last_coordinate_s or 0.0})
    run.close(step)
    if run.rank == 0:
        print("TIMINGS " + json.dumps(timings), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4,8")
    p.add_argument("--boundaries", type=int, default=6)
    p.add_argument("--steps", type=int, default=20, help="steps between boundaries")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--systems", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--atoms", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    volumes = {"small": (16, 32), "large": (256, 64)}  # systems per rank, atoms per system
    rows = []
    for n in map(int, args.procs.split(",")):
        for vol, (systems, atoms) in volumes.items():
            out = tempfile.mkdtemp(prefix=f"bench_boundary_{n}_{vol}_")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "--monitor-interval=0.2", __file__, "--worker", "--out", out, "--systems", str(systems),
                   "--atoms", str(atoms), "--boundaries", str(args.boundaries), "--steps", str(args.steps)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("TIMINGS ")), None)
            if res.returncode != 0 or line is None:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                return 1
            t = json.loads(line[len("TIMINGS "):])[1:]  # the first boundary also creates the groups
            mb = systems * atoms * 4 * 3 * 3 * args.steps / 1e6  # pos+vel+forces f32 per rank per interval
            row = {"procs": n, "volume": vol, "data_MB_per_rank": round(mb, 2)}
            for key in ("sync_s", "exchange_s", "stall_s", "coordinate_s"):
                row[key.replace("_s", "_ms")] = round(statistics.median(x[key] for x in t) * 1e3, 2)
            row["record_bytes"] = int(statistics.median(x["record_bytes"] for x in t))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'procs':>5} {'volume':>6} {'MB/rank':>8} {'sync ms':>8} {'exch ms':>8} {'stall ms':>9} "
          f"{'merge ms':>9} {'record B':>9}")
    for r in rows:
        print(f"{r['procs']:>5} {r['volume']:>6} {r['data_MB_per_rank']:>8} {r['sync_ms']:>8} {r['exchange_ms']:>8} "
              f"{r['stall_ms']:>9} {r['coordinate_ms']:>9} {r['record_bytes']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

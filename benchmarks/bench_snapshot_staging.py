"""Host cost of one SnapshotHook firing (issue 14): µs per call, in "small-op units", and aten ops.

One unit is the host cost of one tiny torch op (``x.add_(1)`` on an 8-element tensor), measured in
the same process, so the figure travels between machines better than µs do.

    python benchmarks/bench_snapshot_staging.py                       # this checkout
    python benchmarks/bench_snapshot_staging.py --compare OLD_ROOT    # OLD_ROOT's dist_hooks beside
                                                                      # this one, alternately
Per size B (systems of 8-64 atoms, ``demo.workload.make_batch``):
  iso_us   median wall time of the call alone (the writer thread drained between calls, untimed)
  cont_us  back-to-back calls, total / calls (the writer thread runs beside them; at large B its
           Zarr encoding, not the call, sets the pace through the buffer pool's back-pressure)
  ops      aten ops the calling thread issued per firing (torch.profiler), and how many of them
           copy or concatenate bytes (copy_/cat/_to_copy/clone)
  replace  iso_us when the engine assigns a new forces tensor (same shape) before every firing
  alt      iso_us when two batches of B systems (other atom counts) alternate: every firing sees
           new tensors of a new shape (the full path: view, schema check, new layout), and its
           top-level aten ops and copying ops (at any depth) per firing
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
from types import SimpleNamespace

COPY_OPS = ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::index_select")


def unit_us(n: int = 20000) -> float:
    import torch
    x = torch.zeros(8)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(ts)


def measure(sizes: list[int], calls: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from dist_hooks import SnapshotHook, ZarrSink
    from dist_hooks.demo.workload import make_batch
    from dist_hooks.stages import Stage

    torch.set_num_threads(1)
    out = {"unit_us": unit_us(), "sizes": {}}
    for B in sizes:
        b = make_batch(B, min_atoms=8, max_atoms=64, seed=0, temperature_k=30.0)
        ctx = SimpleNamespace(batch=b, step_count=0)
        with tempfile.TemporaryDirectory() as d:
            hook = SnapshotHook(ZarrSink(Path(d) / "data.zarr"), rank=0)

            def fire():
                hook(ctx, Stage.AFTER_STEP)
                ctx.step_count += 1

            for _ in range(10):
                fire()
            hook.flush()
            iso = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fire()
                iso.append(time.perf_counter() - t0)
                hook._channel.drain()
            # the engine assigns a new forces tensor before each firing (made outside the timing)
            forces = [torch.randn_like(b.forces) for _ in range(2)]
            rep = []
            for i in range(calls // 2):
                b.forces = forces[i % 2]
                t0 = time.perf_counter()
                fire()
                rep.append(time.perf_counter() - t0)
                hook._channel.drain()
            # two layouts alternately: the full path every firing
            other = make_batch(B, min_atoms=8, max_atoms=64, seed=1, temperature_k=30.0)
            alt = []
            for i in range(calls // 2):
                ctx.batch = other if i % 2 == 0 else b
                t0 = time.perf_counter()
                fire()
                alt.append(time.perf_counter() - t0)
                hook._channel.drain()
            ctx.batch = b
            n_cont = max(calls // 4, 8)
            t0 = time.perf_counter()
            for _ in range(n_cont):
                fire()
            cont = (time.perf_counter() - t0) / n_cont
            hook.flush()
            k = 10
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(k):
                    with record_function("firing"):
                        fire()
                    hook._channel.drain()
            with profile(activities=[ProfilerActivity.CPU]) as prof_alt:
                for i in range(k):
                    ctx.batch = other if i % 2 == 0 else b
                    with record_function("firing"):
                        fire()
                    hook._channel.drain()
            hook.close()
        top, evs = aten_ops(prof.events(), "firing")
        alt_top, alt_evs = aten_ops(prof_alt.events(), "firing")
        out["sizes"][B] = {"iso_us": statistics.median(iso) * 1e6, "cont_us": cont * 1e6,
                           "replace_us": statistics.median(rep) * 1e6, "alt_us": statistics.median(alt) * 1e6,
                           "ops": len(top) / k, "copy_ops": sum(e.name in COPY_OPS for e in top) / k,
                           "all_aten": len(evs) / k, "alt_ops": len(alt_top) / k,
                           "alt_copy_ops": sum(e.name in COPY_OPS for e in alt_evs) / k}
    return out


def aten_ops(events, marker: str) -> tuple[list, list]:
    """The aten ops called directly under ``marker`` (one dispatch each from Python) and all aten
    ops below it (nested ones included); the writer thread's ops are not under the marker."""
    top, every = [], []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        p, depth = e.cpu_parent, 0
        while p is not None and p.name != marker:
            p, depth = p.cpu_parent, depth + 1
        if p is not None:
            every.append(e)
            if depth == 0:
                top.append(e)
    return top, every


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,64,1024")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compare", help="root of another checkout: its dist_hooks measured alternately")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a._child:
        print(json.dumps(measure(sizes, a.calls)))
        return
    here = str(Path(__file__).resolve().parents[1])
    roots = {"this": here} if not a.compare else {"before": str(Path(a.compare).resolve()), "after": here}
    runs: dict[str, list[dict]] = {k: [] for k in roots}
    for _ in range(a.reps):
        for label, root in roots.items():  # alternately, each in a fresh process
            env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, __file__, "--_child", "--sizes", a.sizes, "--calls",
                                str(a.calls)], env=env, cwd=root, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"load average: {os.getloadavg()}")
    for label, rs in runs.items():
        u = statistics.median(r["unit_us"] for r in rs)
        print(f"[{label}] small-op unit (x.add_(1), 8 elements): {u:.2f} us (median of {len(rs)} processes)")
        for B in sizes:
            med = {f: statistics.median(r["sizes"][str(B)][f] for r in rs)
                   for f in ("iso_us", "cont_us", "replace_us", "alt_us", "ops", "copy_ops", "all_aten",
                             "alt_ops", "alt_copy_ops")}
            units = statistics.median(r["sizes"][str(B)]["iso_us"] / r["unit_us"] for r in rs)
            print(f"[{label}] B={B:5d}: iso {med['iso_us']:8.1f} us = {units:6.1f} units | cont "
                  f"{med['cont_us']:8.1f} us | aten ops/firing {med['ops']:.0f} (copy/cat "
                  f"{med['copy_ops']:.0f}, incl. nested {med['all_aten']:.0f}) | replace {med['replace_us']:7.1f} us | alt "
                  f"{med['alt_us']:7.1f} us ({med['alt_ops']:.0f} ops, copy/cat {med['alt_copy_ops']:.0f})")


if __name__ == "__main__":
    main()

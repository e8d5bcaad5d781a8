"""Overhead of recording on the demo workload: no recording vs a seed-style recorder vs dist_hooks.

One process; every variant steps the same batch of Lennard-Jones clusters with velocity Verlet. The
variants are interleaved over repetitions (to cancel drift and thermal effects); each variant's time
per step is divided by the no-recording time of the same repetition, and the median of those ratios
is reported, with the median time per step.

    python benchmarks/bench_hooks.py                     # CPU, 64 systems of 8-64 atoms
    python benchmarks/bench_hooks.py --device cuda --systems 1024 --min-atoms 64 --max-atoms 64
    python benchmarks/bench_hooks.py --systems 1,64,256,1024   # one table per batch size, one run

Batch sizes of a comma list run one after the other in the same process (each its own batch and
repetitions); the JSON has one entry per size under "sizes" (with one size, also the earlier
top-level "systems", "atoms" and "variants").

Variants:
  none            no hook
  seed_csv        upstream-style logging: reductions, .cpu(), one csv.writer row per system per step,
                  the eight columns LoggingHook writes by default (synchronous, per row: the reference)
  log             dist_hooks LoggingHook every step (device ring, one copy per 64 steps, pyarrow CSV)
  snap10          dist_hooks SnapshotHook every 10 steps
  all             LoggingHook every step + SnapshotHook every 10 + ConvergedSnapshotHook
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_hooks import ConvergedSnapshotHook, LoggingHook, SnapshotHook, ZarrSink  # noqa: E402
from dist_hooks.demo.dynamics import VelocityVerlet  # noqa: E402
from dist_hooks.demo.workload import LennardJones, make_batch  # noqa: E402
from dist_hooks.hooks import KB_EV_PER_K  # noqa: E402
from dist_hooks.stages import Stage  # noqa: E402


class SeedStyleLogger:
    """What upstream's design costs: per-step reductions, a blocking host copy, per-row formatting.

    Writes the same columns as ``LoggingHook``'s default CSV (``COLUMNS``), so the comparison is
    the design, not the amount of data: one synchronous ``.cpu()`` per step, one ``csv.writer``
    row per system."""

    COLUMNS = ("step", "rank", "sample_id", "graph_idx", "status", "energy", "fmax", "temperature")
    frequency = 1
    stage = Stage.AFTER_STEP

    def __init__(self, path: Path, rank: int = 0):
        self.rank = rank
        self.fh = open(path, "w", newline="")
        self.w = csv.writer(self.fh)
        self.w.writerow(self.COLUMNS)

    def __call__(self, ctx, stage=None):
        b = ctx.batch
        B = b.num_systems
        fn = b.forces.norm(dim=-1)
        fmax = torch.zeros(B, device=fn.device, dtype=fn.dtype).scatter_reduce(0, b.batch_idx, fn, "amax",
                                                                                include_self=False)
        mv2 = (b.velocities ** 2).sum(-1) * b.atomic_masses
        ke = torch.zeros(B, device=fn.device, dtype=fn.dtype).index_add_(0, b.batch_idx, mv2)
        n = (b.batch_ptr[1:] - b.batch_ptr[:-1]).to(fn.dtype)
        temp = ke / (3 * n * KB_EV_PER_K)
        f64 = torch.float64
        host = torch.stack([b.system_id[:, 0].to(f64), b.status[:, 0].to(f64), b.energy[:, 0].to(f64),
                            fmax.to(f64), temp.to(f64)]).cpu()  # the one blocking copy per step
        ints, floats = host[:2].long().tolist(), host[2:].tolist()
        step, rank = ctx.step_count, self.rank
        for g in range(B):
            self.w.writerow([step, rank, ints[0][g], g, ints[1][g], floats[0][g], floats[1][g], floats[2][g]])

    def close(self):
        self.fh.close()


def make_hooks(variant: str, out: Path, rank_tag: str):
    d = out / f"{variant}-{rank_tag}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if variant == "none":
        return []
    if variant == "seed_csv":
        return [SeedStyleLogger(d / "seed.csv")]
    hooks = []
    if variant in ("log", "all"):
        hooks.append(LoggingHook(log_path=d / "log.csv", rank=0))
    if variant in ("snap10", "all"):
        hooks.append(SnapshotHook(ZarrSink(d / "data.zarr"), frequency=10, rank=0))
    if variant == "all":
        hooks.append(ConvergedSnapshotHook(ZarrSink(d / "data.zarr"), rank=0))
    return hooks


def time_variant(variant: str, args, base_batch, model, out: Path, rep: int) -> float:
    batch = base_batch.clone()
    dyn = VelocityVerlet(model, batch, dt_fs=args.dt, on_converge="new")
    hooks = make_hooks(variant, out, f"r{rep}")
    for h in hooks:
        dyn.register_hook(h)
    dyn.run(args.warmup, manage_hooks=False)
    for h in hooks:  # steady state: files and arrays created, first blocks written, before timing
        if hasattr(h, "flush"):
            h.flush()
    sync(batch.positions.device)
    t0 = time.perf_counter()
    dyn.run(args.steps, manage_hooks=False)
    for h in hooks:  # the recording is only done when it is on disk: count the drain in the timing
        if hasattr(h, "flush"):
            h.flush()
    sync(batch.positions.device)
    dt = (time.perf_counter() - t0) / args.steps
    for h in hooks:
        h.close()
    return dt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(B: int, args, variants: list[str], model, out: Path) -> dict:
    """Every variant at ``B`` systems, interleaved over the repetitions; medians and ratios."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = make_batch(B, min_atoms=args.min_atoms, max_atoms=args.max_atoms, seed=0,
                       device=device, temperature_k=30.0)
    times = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:  # interleaved: every repetition runs every variant once
            times[v].append(time_variant(v, args, batch, model, out / f"b{B}", rep))
    med = {v: statistics.median(t) for v, t in times.items()}
    # ratio per repetition against the no-recording run of the same repetition, then the median: on a
    # shared machine the load drifts between repetitions far more than within one
    ratio = {v: statistics.median(a / b for a, b in zip(times[v], times["none"])) for v in variants}
    return {"systems": B, "atoms": batch.num_atoms,
            "variants": {v: {"ms_per_step": med[v] * 1e3, "ratio": ratio[v],
                             "all_ms": [t * 1e3 for t in times[v]]} for v in variants}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--systems", default="64", help="batch size, or a comma list of them (1,64,256,1024)")
    p.add_argument("--min-atoms", type=int, default=8)
    p.add_argument("--max-atoms", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dt", type=float, default=2.0)
    p.add_argument("--variants", default="none,seed_csv,log,snap10,all")
    p.add_argument("--out", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # each size's table as it is done, also through a pipe
        sys.stdout.reconfigure(line_buffering=True)
    variants = args.variants.split(",")
    if "none" not in variants:
        variants.insert(0, "none")
    try:
        sizes = [int(s) for s in str(args.systems).split(",") if s.strip()]
    except ValueError:
        p.error(f"--systems: expected an integer or a comma list of them, got {args.systems!r}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_hooks_"))
    device = torch.device(args.device)
    model = LennardJones()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = os.getloadavg()
    res = {"device": name, "torch": torch.__version__, "steps": args.steps, "reps": args.reps,
           "load_average": list(load), "sizes": {}}
    print(f"device: {name}; {args.steps} steps x {args.reps} reps; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    try:
        for B in sizes:
            r = res["sizes"][str(B)] = bench_size(B, args, variants, model, out)
            print(f"\n{B} systems, {r['atoms']} atoms")
            print(f"{'variant':>10} {'ms/step':>9} {'ratio':>7}")
            for v, x in r["variants"].items():
                print(f"{v:>10} {x['ms_per_step']:>9.3f} {x['ratio']:>7.3f}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res["load_average_end"] = list(os.getloadavg())
    if len(sizes) == 1:  # the earlier layout, for one size
        res.update({k: res["sizes"][str(sizes[0])][k] for k in ("systems", "atoms", "variants")})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

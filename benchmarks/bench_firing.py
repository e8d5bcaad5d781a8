"""What one firing of each hook costs the calling thread, in µs, in launches and in small torch ops.

Issue 14 asks that "a firing costs about one launch". This benchmark fires each hook from a plain
loop (no simulation between firings, so nothing hides the hook's cost) and reports, per hook and
batch size:

* host µs per firing: the wall time of ``hook(ctx, stage)`` on the calling thread, mean over the
  timed firings (it includes the LoggingHook's one ring copy per 64 firings, and any wait for a
  free host buffer when the writer thread falls behind), and the median single call beside it;
* the drain: ``hook.flush()`` after the timed firings (ms), timed separately; it is what the
  writer thread still had to do;
* the same host cost in units of one small torch op (``UNIT_OP``), timed in the same repetition
  on the same device: per repetition the ratio, then the median of the ratios;
* launches per firing, from ``torch.profiler`` over separate firings (not timed): on CPU the aten
  ops the calling thread dispatches (top-level ones, and every aten event with the nested ones);
  with ``--device cuda`` also the CUDA runtime launch/copy/memset calls and the device kernels and
  copies. The profiler records the calling thread only (the writer thread's work is not counted).
  A kernel launched outside aten (NVIDIA Warp) is not an aten op, and on CPU the profiler does
  not see it at all: Warp launches are counted separately (``warp``: calls of ``wp.launch`` and
  replays of a recorded ``wp.Launch`` during the profiled firings).

The writer thread runs in the background during the timed firings and competes for the GIL and
the cores: that is part of what a firing costs the simulation, and without a simulation step
between firings it is the worst case of it (the writer has the least time to keep up).

    python benchmarks/bench_firing.py                                   # CPU, 1, 64, 1024 systems
    python benchmarks/bench_firing.py --device cuda --log-reductions auto,eager,fused --json f.json

Hooks (``--hooks``): ``log`` (LoggingHook, CSV), ``snap`` (SnapshotHook every firing), ``converged``
(ConvergedSnapshotHook with a ``converged_mask`` that alternates between the even and the odd
systems, and the batch's ``system_id`` shifted by B before every firing, so half the systems are
new each time: the writer writes them, as with inflight replacement). ``--log-reductions`` adds
one LoggingHook per value, built with ``reductions=value``; a value the installed LoggingHook
refuses (TypeError/ValueError at construction or at its first firing) is skipped with a note.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_hooks import ConvergedSnapshotHook, LoggingHook, SnapshotHook, ZarrSink  # noqa: E402
from dist_hooks.demo.workload import LennardJones, make_batch  # noqa: E402

#: the unit of host cost: one small in-place op, dispatched from Python
UNIT_CALLS = 200  # calls per timed block of the unit op
UNIT_BLOCKS = 25  # blocks per measurement; the unit is the median block's time per call
UNIT_OP = (f"host time of x.add_(1), x an 8-element float32 tensor on the benchmark's device: median over "
           f"{UNIT_BLOCKS} blocks of {UNIT_CALLS} calls of the time per call, at the start and end of "
           f"each repetition")
#: errors that mean "this LoggingHook does not offer that option" (skip the variant, with a note)
REFUSED = (TypeError, ValueError, ImportError, NotImplementedError)
#: CUDA runtime/driver calls that put work on a stream
_CUDA_LAUNCH = re.compile(r"^cu(da)?(LaunchKernel|LaunchKernelExC|LaunchCooperativeKernel|GraphLaunch|"
                          r"Memcpy|Memset)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------
def variant_names(args) -> list[str]:
    names = [h for h in args.hooks.split(",") if h]
    for r in (r for r in args.log_reductions.split(",") if r):
        names.append(f"log[{r}]")
    return names


def build_hook(name: str, d: Path) -> Any:
    """A fresh hook of variant ``name`` writing under the new directory ``d`` (may raise REFUSED)."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if name == "log":
        return LoggingHook(log_path=d / "log.csv", rank=0)
    m = re.fullmatch(r"log\[(.+)\]", name)
    if m:
        return LoggingHook(log_path=d / "log.csv", rank=0, reductions=m.group(1))
    if name == "snap":
        return SnapshotHook(ZarrSink(d / "d.zarr"), rank=0)
    if name == "converged":
        return ConvergedSnapshotHook(ZarrSink(d / "d.zarr"), rank=0)
    raise SystemExit(f"unknown hook {name!r}: expected log, snap, converged")


class Firer:
    """Fires one hook with a context like an engine's: step_count advances, and for the converged
    hook a fresh mask and new system ids (outside the timed call)."""

    def __init__(self, hook: Any, batch: Any):
        self.hook = hook
        self.stage = hook.stage
        self.batch = batch
        self.ctx = SimpleNamespace(batch=batch, step_count=0, converged_mask=None, workflow=None)
        self.converged = isinstance(hook, ConvergedSnapshotHook)
        if self.converged:
            g = torch.arange(batch.num_systems, device=batch.device)
            self.masks = (g % 2 == 0, g % 2 == 1)

    def prepare(self) -> None:
        if self.converged:
            self.ctx.converged_mask = self.masks[self.ctx.step_count % 2]
            self.batch.system_id.add_(self.batch.num_systems)  # replaced systems: new ids

    def fire(self, n: int) -> list[int]:
        """``n`` firings; the host ns of each hook call."""
        hook, stage, ctx, out = self.hook, self.stage, self.ctx, []
        clock = time.perf_counter_ns
        for _ in range(n):
            self.prepare()
            t0 = clock()
            hook(ctx, stage)
            out.append(clock() - t0)
            ctx.step_count += 1
        return out


def warm(firer: Firer, args) -> None:
    """First-firing costs out of the way: files opened, kernels compiled, and every host buffer of
    the hook's pool allocated at full size (a LoggingHook takes one per ring of firings)."""
    ring = int(getattr(firer.hook, "ring_size", 1))
    firer.fire(args.warmup + ring * args.buffers)
    firer.hook.flush()
    sync(firer.batch.device)


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------
def time_unit(device: torch.device) -> float:
    """Host µs of one ``UNIT_OP`` call: median over blocks of the time per call."""
    x = torch.zeros(8, device=device)
    for _ in range(UNIT_CALLS):
        x.add_(1)
    sync(device)
    clock = time.perf_counter_ns
    blocks = []
    for _ in range(UNIT_BLOCKS):
        t0 = clock()
        for _ in range(UNIT_CALLS):
            x.add_(1)
        blocks.append((clock() - t0) / UNIT_CALLS)
    sync(device)
    return statistics.median(blocks) / 1e3


def time_hook(name: str, args, batch, out: Path, tag: str) -> dict | str:
    """One repetition of variant ``name``: warm-up, timed firings, timed drain. A note if refused."""
    try:
        hook = build_hook(name, out / f"{name}-{tag}")
    except REFUSED as e:
        return f"refused at construction: {type(e).__name__}: {e}"
    firer = Firer(hook, batch)
    try:
        try:
            warm(firer, args)
        except REFUSED as e:
            return f"refused at its first firing: {type(e).__name__}: {e}"
        calls = firer.fire(args.steps)
        t0 = time.perf_counter()
        hook.flush()
        sync(batch.device)
        flush_s = time.perf_counter() - t0
    finally:
        try:
            hook.close()
        except Exception:  # a refused hook may not close cleanly; the note says why it stopped
            pass
    return {"us_mean": sum(calls) / len(calls) / 1e3, "us_median_call": statistics.median(calls) / 1e3,
            "flush_ms": flush_s * 1e3}


def _under_aten(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def count_events(events, cuda: bool) -> dict:
    """Launch counts of a profile: aten ops of the calling thread; on CUDA, runtime calls and
    device-side kernels/copies."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    aten = [e for e in cpu if e.name.startswith("aten::")]
    top = collections.Counter(e.name for e in aten if not _under_aten(e))
    res = {"aten_top": sum(top.values()), "aten_events": len(aten), "aten_top_ops": dict(top.most_common())}
    if cuda:
        res["cuda_runtime_launches"] = sum(1 for e in cpu if _CUDA_LAUNCH.match(e.name))
        dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        copies = sum(1 for e in dev if e.name.startswith(("Memcpy", "Memset")))
        res["cuda_kernels"] = len(dev) - copies
        res["cuda_copies"] = copies
    return res


@contextlib.contextmanager
def counting_warp_launches():
    """Count NVIDIA Warp kernel launches (``wp.launch`` and replays of a recorded ``wp.Launch``)
    while inside: the profiler sees a Warp kernel on CUDA only, never on CPU. Warp is only
    watched if something imported it already."""
    n = {"warp_launches": 0}
    wp = sys.modules.get("warp")
    cls = getattr(wp, "Launch", None)
    if wp is None or cls is None or not hasattr(wp, "launch"):
        yield n
        return
    launch, replay = wp.launch, cls.launch

    def counted_launch(*a, **kw):
        if not kw.get("record_cmd", False):  # a recorded command is launched by its replay
            n["warp_launches"] += 1
        return launch(*a, **kw)

    def counted_replay(self, *a, **kw):
        n["warp_launches"] += 1
        return replay(self, *a, **kw)

    wp.launch, cls.launch = counted_launch, counted_replay
    try:
        yield n
    finally:
        wp.launch, cls.launch = launch, replay


def profile_calls(fn: Callable[[], Any], n: int, device: torch.device) -> dict:
    """Launch counts per call of ``fn`` (called ``n`` times under the profiler)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof, counting_warp_launches() as warp:
        for _ in range(n):
            fn()
        sync(device)  # device kernels are collected only once they ran
    counts = {**count_events(prof.events(), device.type == "cuda"), **warp}
    ops = {k: v / n for k, v in counts.pop("aten_top_ops").items()}
    return {**{k: v / n for k, v in counts.items()}, "aten_top_ops": ops}


def profile_hook(name: str, args, batch, out: Path) -> dict:
    """Launch counts per firing of variant ``name`` (warmed up first, not timed)."""
    hook = build_hook(name, out / f"{name}-prof")
    firer = Firer(hook, batch)
    try:
        warm(firer, args)

        def one() -> None:
            firer.prepare()
            hook(firer.ctx, firer.stage)
            firer.ctx.step_count += 1
        counts = profile_calls(one, args.profile_firings, batch.device)
        # the converged hook's id shift (outside the hook, see Firer): profiled alone, taken away
        if firer.converged:
            shift = profile_calls(lambda: batch.system_id.add_(batch.num_systems), args.profile_firings,
                                  batch.device)
            ops = counts.pop("aten_top_ops")
            for k, v in shift.pop("aten_top_ops").items():
                ops[k] = ops.get(k, 0.0) - v
            counts = {**{k: v - shift.get(k, 0.0) for k, v in counts.items()},
                      "aten_top_ops": {k: v for k, v in ops.items() if v}}
        return counts
    finally:
        hook.flush()
        hook.close()


def bench_size(B: int, args, device: torch.device, names: list[str], out: Path) -> dict:
    batch = make_batch(B, min_atoms=args.min_atoms, max_atoms=args.max_atoms, seed=0, temperature_k=30.0,
                       device=device)
    res = LennardJones()(batch)  # realistic forces and energies for the recorded values
    batch.forces.copy_(res["forces"])
    batch.energy.copy_(res["energy"].reshape(batch.energy.shape))
    sid0 = batch.system_id.clone()
    units: list[float] = []  # the unit of each repetition: the median of its two ends
    reps: dict[str, list[dict]] = {n: [] for n in names}
    notes: dict[str, str] = {}
    for rep in range(args.reps):
        before = time_unit(device)
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotated: none always first
        done = []
        for n in order:
            if n in notes:
                continue
            batch.system_id.copy_(sid0)
            r = time_hook(n, args, batch, out, f"r{rep}")
            if isinstance(r, str):
                notes[n] = r  # printed with the table
            else:
                reps[n].append(r)
                done.append(r)
        units.append(statistics.median([before, time_unit(device)]))
        for r in done:
            r["units"] = r["us_mean"] / units[-1]
    unit_us = statistics.median(units)
    x = torch.zeros(8, device=device)
    unit_prof = profile_calls(lambda: x.add_(1), 100, device)
    hooks: dict[str, dict] = {}
    for n in names:
        if n in notes or not reps[n]:
            continue
        batch.system_id.copy_(sid0)
        counts = profile_hook(n, args, batch, out)
        rs = reps[n]
        hooks[n] = {"us_per_firing": statistics.median(r["us_mean"] for r in rs),
                    "us_median_call": statistics.median(r["us_median_call"] for r in rs),
                    "units": statistics.median(r["units"] for r in rs),
                    "flush_ms": statistics.median(r["flush_ms"] for r in rs),
                    "launches_per_firing": counts,
                    "all_us": [r["us_mean"] for r in rs]}
    batch.system_id.copy_(sid0)
    return {"systems": B, "atoms": batch.num_atoms, "unit_us": unit_us, "unit_launches": unit_prof,
            "hooks": hooks, "skipped": notes}


def print_table(size: dict, cuda: bool) -> None:
    print(f"\n{size['systems']} systems, {size['atoms']} atoms; unit = {size['unit_us']:.2f} µs "
          f"(aten ops per unit: {size['unit_launches']['aten_top']:.0f} top-level, "
          f"{size['unit_launches']['aten_events']:.0f} events)")
    head = f"{'hook':>12} {'µs/firing':>10} {'p50 call':>8} {'units':>7} {'flush ms':>9} {'aten top':>9} {'aten all':>9} {'warp':>5}"
    if cuda:
        head += f" {'cuda launch':>11} {'kernels':>8} {'copies':>7}"
    print(head)
    for n, h in size["hooks"].items():
        c = h["launches_per_firing"]
        line = (f"{n:>12} {h['us_per_firing']:>10.1f} {h['us_median_call']:>8.1f} {h['units']:>7.1f} "
                f"{h['flush_ms']:>9.2f} {c.get('aten_top', float('nan')):>9.1f} "
                f"{c.get('aten_events', float('nan')):>9.1f} {c.get('warp_launches', float('nan')):>5.1f}")
        if cuda:
            line += (f" {c.get('cuda_runtime_launches', float('nan')):>11.1f} "
                     f"{c.get('cuda_kernels', float('nan')):>8.1f} {c.get('cuda_copies', float('nan')):>7.1f}")
        print(line)
    for n, why in size["skipped"].items():
        print(f"{n:>12} skipped: {why}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--systems", default="1,64,1024", help="comma list of batch sizes")
    p.add_argument("--min-atoms", type=int, default=8)
    p.add_argument("--max-atoms", type=int, default=64)
    p.add_argument("--steps", type=int, default=128, help="timed firings per repetition")
    p.add_argument("--warmup", type=int, default=8,
                   help="untimed firings first, plus ring_size x --buffers for a LoggingHook")
    p.add_argument("--buffers", type=int, default=4, help="host buffers of a hook's pool (the default)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; medians reported")
    p.add_argument("--profile-firings", type=int, default=64,
                   help="firings under the profiler (64: one LoggingHook ring copy among them)")
    p.add_argument("--hooks", default="log,snap,converged")
    p.add_argument("--log-reductions", default="",
                   help="comma list of LoggingHook(reductions=...) values to add as variants, e.g. auto,eager,fused")
    p.add_argument("--out", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # each size's table as it is done, also through a pipe
        sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.systems.split(",") if s]
    names = variant_names(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_firing_"))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = os.getloadavg()
    print(f"device: {name}; torch {torch.__version__}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.steps} firings x {args.reps} reps; unit: {UNIT_OP}")
    res = {"device": name, "torch": torch.__version__, "load_average": list(load), "unit_op": UNIT_OP,
           "steps": args.steps, "reps": args.reps, "sizes": {}}
    try:
        for B in sizes:
            size = bench_size(B, args, device, names, out)
            res["sizes"][str(B)] = size
            print_table(size, device.type == "cuda")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res["load_average_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

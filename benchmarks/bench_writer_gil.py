"""How much of the simulation thread's time the background writer takes (its GIL share), per way of
writing the Zarr shards, side by side in one run.

A *simulation* thread (the main thread) steps a loop of pure Python plus a few small torch
operations, as an engine's step does around its kernels, and counts its loops. A *writer* thread
does what a rank's writer does for one hook, a fixed amount of it:

* snapshots: ``--appends`` appends of the fields of ``demo.workload.make_batch(B)`` (positions
  and velocities moved and forces drawn anew for each append, so that zstd sees float data as a
  run writes it) through ``GroupWriter``, each as ``SnapshotHook``'s writer does it (columns made
  contiguous, their crc32 folded in), with a checkpoint boundary (``sync`` and
  ``take_file_checksums``) every ``--sync-every`` appends and at the end;
* csv: ``LoggingHook``'s blocks (64 firings of B rows, built as its writer builds them) through
  ``CsvLogSink`` (pyarrow), with a boundary every ``--sync-every`` blocks.

The simulation loop's rate with the writer busy, against its rate in the idle windows right
before and after, gives the share of the simulation thread's time the writer takes while it
runs, and ``lost`` = (writer wall time - loops done / idle rate) / appends: the simulation time
the writer costs per append, which does not depend on how fast the writer finishes. Variants of
the snapshot writer:

* ``zarr``: every shard through zarr-python's own codec pipeline (the code before issue 14);
* ``zarrs``: through the ``zarrs`` codec pipeline (Rust; ``pip install zarrs``), enabled with
  ``zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})``. zarrs only takes
  stores whose class is named ``LocalStore`` and then writes the files itself, past the store:
  the benchmark gives it a subclass of the atomic store by that name, so the metadata still goes
  through the store but the shard files do not (no atomic replace, no fsync at boundaries, no
  file checksums; the check below shows it);
* ``raw``: whole shards written as shard files by the project's own code
  (``store.staged_array.ShardFiles``: numcodecs' zstd, the atomic store), the rest through zarr
  (the code after issue 14).

Two controls calibrate the method: ``free`` burns CPU with the GIL released, ``held`` with it
held. On a loaded 2-core machine even ``free`` slows the simulation (CPU contention), so the
loop rates measure CPU taken as much as GIL held.

With ``--py-spy PATH`` (py-spy 0.4, ``pip install py-spy``), each case also runs in a process of
its own whose threads py-spy samples for the GIL (``record --gil --threads``) while the writer
repeats its job: the fraction of samples in which a writer-side thread (the writer, zarr's event
loop and its worker threads) holds the GIL is the writer's GIL share itself, which the loop
rates cannot separate from plain CPU contention on a loaded machine.

Then, unless ``--no-check``, the same small synthetic run (``bench_consolidate.make_synthetic_run``)
written by each variant, compared file for file with ``zarr``'s, verified with ``dist-hooks
verify``, and the file checksums its commit records carry compared with the files.

``--io``: what ``dist-hooks consolidate`` does with shard files, timed for the project's own
shard-file code (``RawArrayReader``, ``RawGroupWriter``), zarr, and zarr with zarrs: every array
of a synthetic rank group read whole, and written whole as a new group (best of ``--reps``,
interleaved). consolidate itself never goes through zarr's codec pipeline for these arrays, so
enabling zarrs does not change ``bench_consolidate.py``; this is what replacing the own code by
zarr + zarrs would change.

    python benchmarks/bench_writer_gil.py                       # B=64 and 1024, 5 repetitions
    python benchmarks/bench_writer_gil.py --systems 1024 --reps 3 --variants zarr,raw
    python benchmarks/bench_writer_gil.py --py-spy "$(which py-spy)" --io   # and the GIL, I/O
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zarr  # noqa: E402

from dist_hooks.batch import BatchView  # noqa: E402
from dist_hooks.demo.workload import make_batch  # noqa: E402
from dist_hooks.hooks.log_sinks import CsvLogSink  # noqa: E402
from dist_hooks.store import group_writer, staged_array, zarr_sink  # noqa: E402
from dist_hooks.store.atomic_store import AtomicLocalStore  # noqa: E402
from dist_hooks.store.checksums import fold_column_crc32  # noqa: E402
from dist_hooks.store.csv_log import FLOAT_COLUMNS, INT_COLUMNS  # noqa: E402
from dist_hooks.store.group_writer import GroupWriter  # noqa: E402

SNAPSHOT_VARIANTS = ("zarr", "zarrs", "raw")
#: controls (see the module docstring): sha256 of a 12 MB buffer, a pure-Python loop; ~10 ms each
CONTROLS = ("free", "held")
VARIANTS = (*SNAPSHOT_VARIANTS, "csv", *CONTROLS)
RING = 64  # LoggingHook's ring_size: firings per CSV block


class LocalStore(AtomicLocalStore):
    """The atomic store under the name zarrs accepts (it checks the class name, then writes the
    chunk files itself with its own filesystem store)."""


def have_zarrs() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def writing_with(variant: str) -> Iterator[None]:
    """Make GroupWriters created and used inside write the way ``variant`` names."""
    saved = staged_array.RAW_SHARD_WRITES
    staged_array.RAW_SHARD_WRITES = variant == "raw"
    try:
        if variant != "zarrs":
            yield
            return
        stores = (group_writer.AtomicLocalStore, zarr_sink.AtomicLocalStore)
        group_writer.AtomicLocalStore = zarr_sink.AtomicLocalStore = LocalStore
        try:
            with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                yield
        finally:
            group_writer.AtomicLocalStore, zarr_sink.AtomicLocalStore = stores
    finally:
        staged_array.RAW_SHARD_WRITES = saved


# ------------------------------------------------------------------------------ workloads
def snapshot_frames(B: int, n_frames: int, seed: int = 0) -> list[tuple[dict, dict, np.ndarray]]:
    """``n_frames`` snapshots of ``make_batch(B)`` as SnapshotHook's writer builds its columns:
    records (step, sample_id, graph_idx, status and the system fields, energy (B,1) -> (B,)),
    atoms (the atom fields), atoms per record."""
    batch = make_batch(B, seed=seed)
    view = BatchView.of(batch)
    rng = np.random.default_rng(seed)
    ptr = view.atoms_ptr.numpy()
    n_atoms = np.diff(ptr).astype(np.int64)
    atoms0 = {k: t.numpy() for k, t in view.atom_fields.items()}
    system = {k: t.numpy() for k, t in view.system_fields.items()
              if k not in ("status", "system_id")}
    frames = []
    for i in range(n_frames):
        atoms = dict(atoms0)
        v = atoms0["velocities"]
        atoms["positions"] = (atoms0["positions"] + i * 0.01 * v).astype(np.float32)
        atoms["velocities"] = (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32)
        atoms["forces"] = rng.normal(0, 0.05, v.shape).astype(np.float32)
        rec = {"step": np.zeros(B, np.int64), "sample_id": view.sample_ids().numpy(),
               "graph_idx": np.arange(B, dtype=np.int64), "status": view.status().numpy()}
        for k, a in system.items():
            rec[k] = a.reshape(B, *a.shape[2:]) if a.ndim == 2 and a.shape[1] == 1 else a
        rec["energy"] = rng.normal(-1.0, 0.1, B).astype(np.float32)
        frames.append((rec, atoms, n_atoms))
    return frames


def snapshot_job(root: Path, frames: list, appends: int, sync_every: int) -> Callable[[], None]:
    """A warm GroupWriter (arrays created, one append flushed) and the timed job on it (which
    may run again: it appends on; ``job.close`` closes the writer)."""
    w = GroupWriter(root, "ranks/rank-00000/snapshots")
    crc: dict[str, int] = {}
    rec, atoms, n = frames[0]
    w.append(rec, atoms, n)
    w.sync()
    w.take_file_checksums()

    count = [0]

    def job() -> None:
        for i in range(appends):
            rec, atoms, n = frames[i % len(frames)]
            count[0] += 1
            rec = {**rec, "step": np.full(len(n), 10 * count[0], np.int64)}
            rec = {k: np.ascontiguousarray(v) for k, v in rec.items()}
            atoms = {k: np.ascontiguousarray(v) for k, v in atoms.items()}
            fold_column_crc32(crc, {**rec, **atoms})
            w.append(rec, atoms, n)
            if (i + 1) % sync_every == 0:
                w.sync()
                w.take_file_checksums()
        w.sync()
        w.take_file_checksums()

    job.close = w.close  # type: ignore[attr-defined]
    return job


def csv_job(root: Path, B: int, blocks: int, sync_every: int) -> Callable[[], None]:
    """LoggingHook's writer side: a block of RING firings of B rows each, built as
    ``LoggingHook._write_block`` builds it from the ring, appended through ``CsvLogSink``."""
    sink = CsvLogSink(root / "logs" / "log", 0)
    sink.start(list(INT_COLUMNS) + list(FLOAT_COLUMNS))
    rng = np.random.default_rng(1)
    ring = rng.normal(0, 1, (RING, 2 + len(FLOAT_COLUMNS), B))
    ring[:, 0, :] = np.arange(B)
    ring[:, 1, :] = 0

    count = [0]

    def job() -> None:
        for _ in range(blocks):
            a = ring
            n = a.shape[0]
            steps = list(range(count[0] * RING, (count[0] + 1) * RING))
            count[0] += 1
            cols: dict[str, Any] = {
                "step": np.repeat(np.asarray(steps, dtype=np.int64), B),
                "rank": np.full(n * B, 0, dtype=np.int64),
                "sample_id": a[:, 0, :].reshape(-1).astype(np.int64),
                "graph_idx": np.tile(np.arange(B, dtype=np.int64), n),
                "status": a[:, 1, :].reshape(-1).astype(np.int64)}
            for j, name in enumerate(FLOAT_COLUMNS):
                cols[name] = a[:, 2 + j, :].reshape(-1).copy()
            sink.append(cols, steps)
            sink.flush()
            if count[0] % sync_every == 0:
                sink.sync()
        sink.sync()

    job.close = sink.close  # type: ignore[attr-defined]
    return job


def control_job(kind: str, units: int) -> Callable[[], None]:
    buf = np.random.default_rng(2).bytes(12 << 20)

    def job() -> None:
        for _ in range(units):
            if kind == "free":
                hashlib.sha256(buf).digest()  # ~10 ms, GIL released (hashlib: > 2 KB)
            else:
                x = 0
                for i in range(140_000):
                    x += i & 7

    job.close = lambda: None  # type: ignore[attr-defined]
    return job


# ----------------------------------------------------------------------- the simulation
class Simulation:
    """The simulation thread's loop: some pure Python (an engine's bookkeeping around its
    kernels) and a few small torch operations (their dispatch holds the GIL)."""

    def __init__(self) -> None:
        self.x = torch.randn(256)
        self.d: dict[int, float] = {}

    def step(self) -> None:
        d = self.d
        for i in range(32):
            d[i & 7] = d.get(i & 7, 0.0) * 0.5 + i
        y = torch.mul(self.x, 1.0001)
        y.add_(1e-6)
        self.x.copy_(y)
        y.sum()

    def idle(self, seconds: float) -> float:
        """Loops per second with nothing else running."""
        n, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(16):
                self.step()
            n += 16
            t = time.perf_counter()
            if t >= end:
                return n / (t - t0)

    def beside(self, job: Callable[[], None]) -> dict[str, float]:
        """Run ``job`` in a writer thread; loop until it is done. Wall and CPU times of the job
        (the process's CPU less this thread's: the writer's own threads and zarr's included)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            t0 = time.perf_counter()
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["error"] = exc
            box["wall"] = time.perf_counter() - t0
            done.set()

        p0, s0 = time.process_time(), time.thread_time()
        th = threading.Thread(target=run, name="writer")
        n, t0 = 0, time.perf_counter()
        th.start()
        while not done.is_set():
            self.step()
            n += 1
        t1 = time.perf_counter()
        th.join()
        if "error" in box:
            raise box["error"]
        sim_cpu = time.thread_time() - s0
        return {"wall": box["wall"], "loops": n, "sim_wall": t1 - t0,
                "writer_cpu": time.process_time() - p0 - sim_cpu}


# ------------------------------------------------------------------- sampled GIL share
def make_job(v: str, B: int, d: Path, frames: dict, appends: dict, blocks: dict,
             sync_every: int) -> tuple[Callable[[], None], int]:
    """The writer job of case (``v``, ``B``) writing under ``d``, and its units of work."""
    if v == "csv":
        return csv_job(d, B, blocks[B], max(1, blocks[B] // 2)), blocks[B]
    if v in CONTROLS:
        return control_job(v, 40), 40
    return snapshot_job(d, frames[B], appends[B], sync_every or max(1, appends[B] // 2)), \
        appends[B]


def child(args: argparse.Namespace, work: Path) -> dict:
    """One case in this process, sampled by py-spy (see module docstring): the writer repeats
    the job (appending on to the same group) for as long as py-spy samples, and a little
    longer on both sides."""
    v, B = args.child[0], int(args.child[1])
    torch.set_num_threads(1)
    sim = Simulation()
    frames = {B: snapshot_frames(B, 4)} if v in SNAPSHOT_VARIANTS else {}
    appends = {B: args.appends or (32 if B >= 512 else 200)}
    blocks = {B: max(2, appends[B] // (16 if B >= 512 else 4))}
    out = work / "gil.txt"
    stop = threading.Event()
    done: list[tuple[float, int]] = []  # (end time, units) of each job

    with writing_with(v if v in SNAPSHOT_VARIANTS else "zarr"):
        job, units = make_job(v, B, work / "job", frames, appends, blocks, args.sync_every)

    def writer() -> None:
        with writing_with(v if v in SNAPSHOT_VARIANTS else "zarr"):
            while not stop.is_set():
                job()
                done.append((time.perf_counter(), units))
            job.close()

    th = threading.Thread(target=writer, name="writer")
    th.start()
    time.sleep(0.3)
    spy = subprocess.Popen([args.py_spy, "record", "--gil", "--threads", "--nonblocking",
                            "--rate", str(args.rate), "--duration", str(args.seconds),
                            "--format", "raw", "-o", str(out), "--pid", str(os.getpid())],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)  # py-spy attaching
    n, t0 = 0, time.perf_counter()
    while spy.poll() is None:
        sim.step()
        n += 1
    t1 = time.perf_counter()
    stop.set()
    th.join()
    err = spy.stderr.read().decode() if spy.stderr else ""
    per_thread: dict[str, int] = {}
    for line in out.read_text().splitlines():
        head, _, count = line.rpartition(" ")
        name = head.split(";", 1)[0]
        name = name.split(": ", 1)[1] if ": " in name else "?"
        per_thread[name] = per_thread.get(name, 0) + int(count)
    total = args.seconds * args.rate
    units = sum(u for t, u in done if t0 <= t <= t1)  # jobs finished while sampled
    jobs_s = [t for t, _ in done]
    return {"per_thread": per_thread, "samples": total, "spy_stderr": err[-300:],
            "writer_gil": sum(c for k, c in per_thread.items() if k not in ("MainThread",))
            / total, "sim_gil": per_thread.get("MainThread", 0) / total,
            "sim_rate": n / (t1 - t0), "units_per_s": units / (t1 - t0) if units else
            (len(jobs_s) and 0.0)}


def sampled(args: argparse.Namespace) -> dict:
    """Each case in a child process under py-spy, cases interleaved over repetitions."""
    cases = [(B, v) for B in args.systems for v in args.variants if v not in CONTROLS]
    cases += [(args.systems[0], v) for v in args.variants if v in CONTROLS]
    rows: dict[tuple[int, str], list[dict]] = {}
    for rep in range(args.reps):
        k = rep % len(cases)
        for B, v in cases[k:] + cases[:k]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, str(B),
                   "--py-spy", args.py_spy, "--seconds", str(args.seconds), "--rate",
                   str(args.rate), "--appends", str(args.appends), "--sync-every",
                   str(args.sync_every)] + (["--dir", args.dir] if args.dir else [])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
            if res.returncode:
                raise RuntimeError(f"child {v} B={B} failed: {res.stderr[-2000:]}")
            rows.setdefault((B, v), []).append(json.loads(res.stdout.strip().splitlines()[-1]))
    out = {}
    for (B, v), rs in rows.items():
        share = [r["writer_gil"] for r in rs]
        ups = [r["units_per_s"] for r in rs]
        out[f"{v} B={B}" if v not in CONTROLS else v] = {
            "writer_gil": statistics.median(share), "writer_gil_range": [min(share), max(share)],
            "sim_gil": statistics.median(r["sim_gil"] for r in rs),
            "units_per_s": statistics.median(ups),
            # GIL time per unit of work: share of the wall time over the units done in it
            "gil_ms_per_unit": statistics.median(
                1e3 * r["writer_gil"] / r["units_per_s"] for r in rs if r["units_per_s"])
            if any(ups) else None}
    return out


# ---------------------------------------------------------------- consolidate's shard I/O
def io_bench(args: argparse.Namespace, work: Path, bench_consolidate: Any) -> dict:
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore as PlainLocalStore

    from dist_hooks.store.array_layout import ZSTD_LEVEL
    from dist_hooks.store.raw_group_writer import RawGroupWriter
    from dist_hooks.store.shard_files import RawArrayReader

    run = work / "io-run"
    with writing_with("raw"):
        bench_consolidate.make_synthetic_run(run, ranks=1, steps=args.io_steps, systems=64,
                                             min_atoms=8, max_atoms=64)
    root = run / "data.zarr"
    group = "ranks/rank-00000/snapshots"
    levels = json.loads((root / group / "zarr.json").read_text())["attributes"]["level"]
    names = [*levels, "atoms_ptr"]
    nbytes = sum(f.stat().st_size for f in (root / group).rglob("c.*"))
    data: dict[str, np.ndarray] = {}

    def read_own() -> None:
        for n in names:
            r = RawArrayReader.open(root / group / n, n)
            data[n] = r.read(0, json.loads((root / group / n / "zarr.json").read_text())
                             ["shape"][0])

    def read_zarr() -> None:
        g = zarr.open_group(PlainLocalStore(root), path=group, mode="r", use_consolidated=False)
        for n in names:
            data[n] = g[n][:]

    def write_own(out: Path) -> None:
        w = RawGroupWriter(AtomicLocalStore(out, fsync="never"), "g", chunk_records=1024,
                           chunk_atoms=65536, chunks_per_shard=16, atoms_ptr=False)
        rec = {n: data[n] for n, lv in levels.items() if lv == "record"}
        at = {n: data[n] for n, lv in levels.items() if lv == "atom"}
        w.append(rec, at, np.diff(data["atoms_ptr"]))
        w.close()

    def write_zarr(out: Path) -> None:
        store = PlainLocalStore(out)
        for n, lv in levels.items():
            a = data[n]
            rows = 1024 if lv == "record" else 65536
            arr = zarr.create_array(store, name=f"g/{n}", shape=a.shape, dtype=a.dtype,
                                    chunks=(rows, *(max(d, 1) for d in a.shape[1:])),
                                    shards=(16 * rows, *(max(d, 1) for d in a.shape[1:])),
                                    compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0)
            arr[:] = a

    zarrs_cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
    cases: dict[str, Callable[[Path], None]] = {
        "read own": lambda _: read_own(), "read zarr": lambda _: read_zarr(),
        "write own": write_own, "write zarr": write_zarr}
    if have_zarrs():
        def read_zarrs(_: Path) -> None:
            with zarr.config.set(zarrs_cfg):
                read_zarr()

        def write_zarrs(out: Path) -> None:
            with zarr.config.set(zarrs_cfg):
                write_zarr(out)
        cases.update({"read zarrs": read_zarrs, "write zarrs": write_zarrs})
    read_own()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.reps + 1):  # the first round untimed
        for name, fn in cases.items():
            out = work / f"io-out-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            fn(out)
            dt = time.perf_counter() - t
            if rep:
                times[name].append(dt)
            shutil.rmtree(out, ignore_errors=True)
    return {"mb_on_disk": nbytes / 1e6, "raw_mb": sum(a.nbytes for a in data.values()) / 1e6,
            **{k: {"best_ms": 1e3 * min(v), "median_ms": 1e3 * statistics.median(v)}
               for k, v in times.items()}}


# ------------------------------------------------------------------------------ the run
def measure(args: argparse.Namespace, work: Path) -> dict:
    sim = Simulation()
    torch.set_num_threads(1)
    frames = {B: snapshot_frames(B, 4) for B in args.systems}
    appends = {B: args.appends or (32 if B >= 512 else 200) for B in args.systems}
    blocks = {B: max(2, appends[B] // (16 if B >= 512 else 4)) for B in args.systems}
    sizes = {B: sum(a.nbytes for a in (*frames[B][0][0].values(), *frames[B][0][1].values()))
             for B in args.systems}
    rows: dict[tuple[int, str], list[dict]] = {}
    sim.idle(0.5)  # warm up
    for rep in range(args.reps):
        cases = [(B, v) for B in args.systems for v in args.variants]
        k = rep % len(cases)
        for B, v in cases[k:] + cases[:k]:  # rotated: each variant in every position
            d = work / f"{v}-{B}-{rep}"
            if v in CONTROLS and B != args.systems[0]:
                continue  # one per repetition
            with writing_with(v if v in SNAPSHOT_VARIANTS else "zarr"):
                job, units = make_job(v, B, d, frames, appends, blocks, args.sync_every)
                before = sim.idle(args.idle)
                got = sim.beside(job)
                after = sim.idle(args.idle)
                job.close()
            idle = (before + after) / 2
            busy = got["loops"] / got["sim_wall"]
            lost = got["wall"] - got["loops"] / idle
            rows.setdefault((B, v), []).append({
                "idle": idle, "busy": busy, "share": 1 - busy / idle,
                "lost_ms": 1e3 * lost / units, "wall_ms": 1e3 * got["wall"] / units,
                "cpu_ms": 1e3 * got["writer_cpu"] / units,
                "lost_per_cpu": lost / max(got["writer_cpu"], 1e-9)})
            shutil.rmtree(d, ignore_errors=True)
    out = {}
    for (B, v), rs in rows.items():
        out[f"{v} B={B}" if v not in CONTROLS else v] = {
            "B": B, "variant": v, "unit": {"csv": "block", "free": "sha256 of 12 MB",
                                           "held": "140k Python loops"}.get(v, "append"),
            "mb_per_unit": (RING * B * 8 * 8 if v == "csv" else sizes[B] if v in
                            SNAPSHOT_VARIANTS else 0) / 1e6,
            **{k: statistics.median(r[k] for r in rs) for k in rs[0]},
            "share_range": [min(r["share"] for r in rs), max(r["share"] for r in rs)],
            "lost_ms_range": [min(r["lost_ms"] for r in rs), max(r["lost_ms"] for r in rs)]}
    return out


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _file_checksums_hold(run: Path) -> tuple[int, int, int]:
    """(entries, entries that match their file, atom shard files without an entry) of the
    commit records' ``files``."""
    entry = json.loads((run / "run.json").read_text())["last"]
    n = ok = 0
    missing = 0
    for r in entry["ranks"]:
        for hook in r["hooks"].values():
            if hook.get("kind") != "zarr":
                continue
            gdir = run / "data.zarr" / hook["group"]
            files = hook.get("files") or {}
            for rel, (size, crc) in files.items():
                data = (gdir / rel).read_bytes()
                n += 1
                ok += len(data) == size and zlib.crc32(data) == crc
            lev = json.loads((gdir / "zarr.json").read_text())["attributes"]["level"]
            for name, level in lev.items():
                if level == "atom":
                    for f in (gdir / name).glob("c.*"):
                        missing += f"{name}/{f.name}" not in files
    return n, ok, missing


def check(args: argparse.Namespace, work: Path, bench_consolidate: Any) -> dict:
    """The same synthetic run by each variant: files against zarr's, verify, file checksums."""
    runs = {}
    for v in args.check_variants:
        run = work / f"check-{v}"
        with writing_with(v):
            bench_consolidate.make_synthetic_run(run, ranks=2, steps=40, systems=64, min_atoms=8,
                                                 max_atoms=64, chunk_records=256,
                                                 chunk_atoms=4096, chunks_per_shard=4)
        runs[v] = run
    ref = _digest(runs["zarr"] / "data.zarr")
    out = {}
    for v, run in runs.items():
        got = _digest(run / "data.zarr")
        res = subprocess.run([sys.executable, "-m", "dist_hooks.cli", "verify", "--json",
                              str(run)], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            report = json.loads(res.stdout)
        except json.JSONDecodeError:
            report = {"ok": False, "error": (res.stdout + res.stderr)[-500:]}
        n, ok, missing = _file_checksums_hold(run)
        out[v] = {"files": len(got), "differ_from_zarr": sorted(
                      k for k in set(ref) | set(got) if ref.get(k) != got.get(k)),
                  "verify_ok": bool(report.get("ok")), "verify_rc": res.returncode,
                  "file_checksums": n, "file_checksums_ok": ok,
                  "atom_files_without_checksum": missing}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", type=lambda s: [int(x) for x in s.split(",")],
                    default=[64, 1024])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--appends", type=int, default=0,
                    help="appends per measurement (0: 200 at B < 512, else 32)")
    ap.add_argument("--sync-every", type=int, default=0,
                    help="appends between boundaries (0: two boundaries per measurement)")
    ap.add_argument("--idle", type=float, default=0.3, help="seconds of each idle window")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--py-spy", default=None, help="py-spy binary: also sample the GIL")
    ap.add_argument("--seconds", type=int, default=4, help="seconds py-spy samples per case")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--no-loops", dest="loops", action="store_false",
                    help="leave out the in-process loop-rate measurement")
    ap.add_argument("--io", action="store_true", help="also time consolidate's shard I/O")
    ap.add_argument("--io-only", action="store_true", help="only that (and the check)")
    ap.add_argument("--io-steps", type=int, default=400)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        work = Path(tempfile.mkdtemp(prefix="bench_gil_child_", dir=args.dir))
        try:
            print(json.dumps(child(args, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if not have_zarrs():
        print("zarrs is not installed: leaving out the zarrs variant", file=sys.stderr)
        args.variants = [v for v in args.variants if v != "zarrs"]
    args.check_variants = [v for v in SNAPSHOT_VARIANTS if v in ("zarr", *args.variants)]

    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_consolidate",
                                                  ROOT / "benchmarks" / "bench_consolidate.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)

    work = Path(tempfile.mkdtemp(prefix="bench_gil_", dir=args.dir))
    try:
        load0 = os.getloadavg()
        res = measure(args, work) if args.loops and not args.io_only else {}
        gil = sampled(args) if args.py_spy and not args.io_only else {}
        io = io_bench(args, work, bc) if args.io or args.io_only else {}
        load1 = os.getloadavg()
        checked = check(args, work, bc) if args.check else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"cpus": os.cpu_count(), "load_before": load0, "load_after": load1,
            "zarr": zarr.__version__, "torch": torch.__version__, "reps": args.reps}
    if args.json:
        print(json.dumps({"meta": meta, "results": res, "gil": gil, "io": io,
                          "check": checked}, indent=1))
        return 0
    print(f"{meta['cpus']} CPUs, load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
          f"zarr {meta['zarr']}, torch {meta['torch']}; medians of {args.reps} interleaved reps")
    if res:
        print("simulation loops/s, idle and beside the writer; lost = simulation time the writer "
              "costs per unit:")
        print(f"{'variant':<14}{'MB/unit':>8}{'idle/s':>9}{'busy/s':>9}{'share':>8}"
              f"{'range':>13}{'lost ms/unit':>13}{'range':>14}{'wall ms':>9}{'cpu ms':>8}"
              f"{'lost/cpu':>9}")
    for name, r in res.items():
        print(f"{name:<14}{r['mb_per_unit']:>8.2f}{r['idle']:>9.0f}{r['busy']:>9.0f}"
              f"{100 * r['share']:>7.1f}%{100 * r['share_range'][0]:>6.1f}-"
              f"{100 * r['share_range'][1]:.1f}%{r['lost_ms']:>13.2f}"
              f"{r['lost_ms_range'][0]:>7.2f}-{r['lost_ms_range'][1]:.2f}"
              f"{r['wall_ms']:>9.2f}{r['cpu_ms']:>8.2f}{r['lost_per_cpu']:>9.2f}")
    if gil:
        print(f"GIL held, sampled by py-spy ({args.seconds} s at {args.rate}/s per case; "
              f"medians of {args.reps}):")
        print(f"{'variant':<14}{'writer':>8}{'range':>14}{'sim':>7}{'units/s':>9}"
              f"{'GIL ms/unit':>12}")
        for name, r in gil.items():
            g = r["gil_ms_per_unit"]
            print(f"{name:<14}{100 * r['writer_gil']:>7.1f}%{100 * r['writer_gil_range'][0]:>7.1f}-"
                  f"{100 * r['writer_gil_range'][1]:.1f}%{100 * r['sim_gil']:>6.1f}%"
                  f"{r['units_per_s']:>9.1f}{'' if g is None else f'{g:.2f}':>12}")
    if io:
        print(f"consolidate's shard I/O: one rank group, {io['raw_mb']:.0f} MB of rows, "
              f"{io['mb_on_disk']:.0f} MB of shard files; best / median of {args.reps} ms:")
        for k, r in io.items():
            if isinstance(r, dict):
                print(f"  {k:<12}{r['best_ms']:>9.1f}{r['median_ms']:>9.1f}")
    for v, c in checked.items():
        print(f"check {v}: {c['files']} files, {len(c['differ_from_zarr'])} differ from zarr's "
              f"{c['differ_from_zarr'][:4]}; verify ok={c['verify_ok']}; file checksums "
              f"{c['file_checksums_ok']}/{c['file_checksums']} hold, "
              f"{c['atom_files_without_checksum']} atom files without one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

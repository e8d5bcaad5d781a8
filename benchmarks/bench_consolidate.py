"""Throughput and peak memory of ``dist-hooks consolidate`` against a plain copy of the same bytes.

A synthetic run (W ranks, each with a snapshot trajectory, a converged group and a CSV log,
committed by a manifest exactly like ``Run`` writes it) is built on the benchmark's disk; then

* ``copytree``: ``shutil.copytree`` of the run's data and logs (the bytes consolidate reads) to a
  new directory on the same disk, then a sync: the floor any reorganisation of the data has to
  pay;
* ``consolidate``: ``dist-hooks consolidate`` (which syncs its output too).

Each variant runs in a fresh process (so that peak RSS and the tracemalloc peak belong to it
alone), which first runs one untimed copy and one untimed consolidate (imports and first-use
costs paid, page cache warm), then ``--repeat`` pairs: a copy, then a consolidate, timed side by
side, so that both see the same state of a shared machine. Throughput is over the run's bytes
on disk (what both read). Reported: the best time of each, and the median and range of the
per-pair ratios copy/consolidate; the target is consolidate >= 0.5x copytree. Three
variants: the default (every committed checksum checked), ``--no-checksums`` (trajectory shard
files copied after an index check only) and the default plus Parquet (what the command does
by default when pyarrow is installed).

    python benchmarks/bench_consolidate.py                  # ~200 MB of raw data, 4 ranks
    python benchmarks/bench_consolidate.py --raw-mb 50 --ranks 2 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _crc(arrays: dict[str, np.ndarray], crc: dict[str, int]) -> None:
    for k, v in arrays.items():
        v = np.ascontiguousarray(v)
        crc[k] = zlib.crc32(v, crc.get(k, 0)) if v.size else crc.get(k, 0)


def make_synthetic_run(path: str | os.PathLike, *, ranks: int = 2, steps: int = 40,
                       systems: int = 16, min_atoms: int = 8, max_atoms: int = 32,
                       chunk_records: int = 1024, chunk_atoms: int = 65536, chunks_per_shard: int = 16,
                       seed: int = 0, steps_per_append: int = 8, final: bool = True) -> Path:
    """Write a committed run as ``Run`` would: per-rank snapshot groups (every step), converged
    groups (each system once), CSV logs, the merged converged group, boundary file and manifest.

    Fields and dtypes follow the demo (float32 positions/velocities/forces, int64 ids). Written
    in appends of ``steps_per_append`` steps, so memory stays small for large runs.
    """
    from dist_hooks.store import layout
    from dist_hooks.store.csv_log import CsvLog
    from dist_hooks.store.group_writer import GroupWriter
    from dist_hooks.store.zarr_sink import ZarrSink
    from dist_hooks.records import merge_blocks
    from dist_hooks.tools.record_source import ZarrSource

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sink = ZarrSink(path / layout.DATA_DIR, chunk_records=chunk_records, chunk_atoms=chunk_atoms,
                    chunks_per_shard=chunks_per_shard, fsync="never")
    sink.root.require_group(layout.RANKS_GROUP)
    rank_entries = []
    for r in range(ranks):
        rng = np.random.default_rng((seed, r))
        counts = rng.integers(min_atoms, max_atoms + 1, systems).astype(np.int64)
        sids = r * systems + np.arange(systems, dtype=np.int64)
        conv_step = np.sort(rng.integers(1, steps, systems))
        conv_order = np.argsort(conv_step, kind="stable")
        numbers = np.full(int(counts.sum()), 18, np.int64)
        masses = np.full(int(counts.sum()), 39.948, np.float32)
        snap = sink.writer(r, "snapshots")
        conv = sink.writer(r, "converged")
        log = CsvLog(layout.csv_path(path, "log", r))
        crc_s: dict[str, int] = {}
        crc_c: dict[str, int] = {}
        for s0 in range(0, steps, steps_per_append):
            st = np.arange(s0, min(s0 + steps_per_append, steps), dtype=np.int64)
            k = len(st)
            rec = {"step": np.repeat(st, systems), "sample_id": np.tile(sids, k),
                   "graph_idx": np.tile(np.arange(systems, dtype=np.int64), k),
                   "status": (np.repeat(st, systems) >= np.tile(conv_step, k)).astype(np.int64),
                   "energy": rng.normal(-1.0, 0.2, k * systems).astype(np.float32),
                   "cell": np.tile(np.eye(3, dtype=np.float32) * 20, (k * systems, 1, 1)),
                   "pbc": np.zeros((k * systems, 3), bool)}
            n_at = int(counts.sum()) * k
            atoms = {"positions": rng.normal(0, 3, (n_at, 3)).astype(np.float32),
                     "velocities": rng.normal(0, 0.01, (n_at, 3)).astype(np.float32),
                     "forces": rng.normal(0, 0.1, (n_at, 3)).astype(np.float32),
                     "atomic_numbers": np.tile(numbers, k), "atomic_masses": np.tile(masses, k)}
            n_atoms = np.tile(counts, k)
            _crc(rec, crc_s)
            _crc(atoms, crc_s)
            snap.append(rec, atoms, n_atoms)
            # converged: the systems whose convergence step falls in this append, once each
            hit = conv_order[(conv_step[conv_order] >= st[0]) & (conv_step[conv_order] <= st[-1])]
            if len(hit):
                ptr = np.concatenate([[0], np.cumsum(counts)])
                rows = np.concatenate([np.arange(ptr[i], ptr[i + 1]) for i in hit])
                crec = {"step": conv_step[hit], "sample_id": sids[hit],
                        "graph_idx": hit.astype(np.int64),
                        "status": np.ones(len(hit), np.int64),
                        "energy": rng.normal(-1.0, 0.2, len(hit)).astype(np.float32),
                        "cell": np.tile(np.eye(3, dtype=np.float32) * 20, (len(hit), 1, 1)),
                        "pbc": np.zeros((len(hit), 3), bool)}
                catoms = {"positions": atoms["positions"][rows],
                          "velocities": atoms["velocities"][rows],
                          "forces": atoms["forces"][rows],
                          "atomic_numbers": numbers[rows], "atomic_masses": masses[rows]}
                _crc(crec, crc_c)
                _crc(catoms, crc_c)
                conv.append(crec, catoms, counts[hit])
            log.append({"step": rec["step"], "rank": np.full(k * systems, r, np.int64),
                        "sample_id": rec["sample_id"], "graph_idx": rec["graph_idx"],
                        "status": rec["status"], "energy": rec["energy"].astype(np.float64),
                        "fmax": np.abs(rng.normal(0, 0.1, k * systems)),
                        "temperature": np.abs(rng.normal(30, 5, k * systems))})
        snap.sync()
        conv.sync()
        log.sync()
        snap_files, conv_files = snap.take_file_checksums(), conv.take_file_checksums()
        log.close()
        hooks = {
            "log": {"path": str(layout.csv_path(path, "log", r).relative_to(path)),
                    "bytes": log.size, "rows": log.rows, "crc32": log.crc32, "kind": "csv",
                    "converged": False},
            "snapshots": {"group": snap.group_path, **snap.committed_lengths(), "crc32": crc_s,
                          "files": snap_files, "kind": "zarr", "converged": False},
            "converged": {"group": conv.group_path, **conv.committed_lengths(), "crc32": crc_c,
                          "files": conv_files, "kind": "zarr", "converged": True},
        }
        snap.close()
        conv.close()
        rank_entries.append({"rank": r, "step": steps, "final": final, "signal": None,
                             "time": 0.0, "hooks": hooks})
    # the coordinator's merged converged group
    sources = [(e["rank"], ZarrSource(path / layout.DATA_DIR, e["hooks"]["converged"]["group"],
                                      place="x", records=e["hooks"]["converged"]["records"]))
               for e in rank_entries]
    mw = GroupWriter(path / layout.DATA_DIR, layout.CONVERGED_GROUP,
                     chunk_records=chunk_records, chunk_atoms=chunk_atoms, fsync="never")
    for b in merge_blocks(sources, dedup=True):
        mw.append(b.rec, b.atoms, np.diff(b.ptr))
    mw.sync()
    merged = mw.committed_lengths()
    mw.close()
    entry = {"index": 0, "time": 0.0, "all_final": final, "steps": [steps] * ranks,
             "ranks": rank_entries, "merged": merged}
    (path / "boundaries").mkdir(exist_ok=True)
    (path / "boundaries" / "b-000000.json").write_text(json.dumps(entry, indent=1))
    manifest = {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION,
                "dist_hooks_version": "0.1.0", "created": 0.0, "world_size": ranks,
                "launcher": "synthetic", "job_id": None, "storage": "shared",
                "checkpoint_every": None, "settings": {"synthetic": True},
                "hooks": {"log": {"type": "LoggingHook", "frequency": 1, "stage": "AFTER_STEP"},
                          "snapshots": {"type": "SnapshotHook", "frequency": 1,
                                        "stage": "AFTER_STEP"},
                          "converged": {"type": "ConvergedSnapshotHook", "frequency": 1,
                                        "stage": "ON_CONVERGE"}},
                "boundaries": [{"index": 0, "time": 0.0, "steps": [steps, steps],
                                "file": "boundaries/b-000000.json",
                                "converged_count": merged["records"], "all_final": final}],
                "last": entry}
    (path / "run.json").write_text(json.dumps(manifest, indent=1))
    return path


def _span(values: list[float], digits: int = 3) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


_CHILD = r"""
import json, os, resource, shutil, sys, time, tracemalloc
sys.path.insert(0, {root!r})
trace = {trace!r}
from dist_hooks.tools.consolidate import consolidate
run, out, copy_dst = {run!r}, {out!r}, {copy_dst!r}

def clean(path):
    # untimed, before either timed operation: the previous output removed and every pending
    # write (its deletion included) on disk, so that neither pays for the other's leftovers
    shutil.rmtree(path, ignore_errors=True)
    os.sync()

def copy():
    clean(copy_dst)
    t = time.perf_counter()
    shutil.copytree(os.path.join(run, "data.zarr"), os.path.join(copy_dst, "data.zarr"))
    shutil.copytree(os.path.join(run, "logs"), os.path.join(copy_dst, "logs"))
    os.sync()
    dt = time.perf_counter() - t
    clean(copy_dst)
    return dt

def once():
    clean(out)
    t = time.perf_counter()
    consolidate(run, out, force=True, progress=False, parquet={parquet!r},
                checksums={checksums!r})
    return time.perf_counter() - t

# one untimed run of each first: imports and first-use costs are paid once per process, and
# the page cache is warm for both
copy()
once()
pairs = []
if trace:
    tracemalloc.start()
for _ in range({repeat!r}):
    pairs.append((copy(), once()))  # side by side: the machine's state is the same for both
peak = tracemalloc.get_traced_memory()[1] if trace else None
print("RESULT " + json.dumps({{"pairs": pairs, "tracemalloc_peak": peak,
      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def run_child(run: Path, out: Path, *, parquet: bool, trace: bool, checksums: bool = True,
              repeat: int = 1) -> dict:
    """``repeat`` pairs of (copytree seconds, consolidate seconds), each copy timed right
    before its consolidate, in a fresh process (so that peak memory belongs to it alone)."""
    code = _CHILD.format(root=str(ROOT), run=str(run), out=str(out), parquet=parquet, trace=trace,
                         checksums=checksums, repeat=repeat, copy_dst=str(out) + ".copy")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def baseline_rss() -> int:
    code = (f"import sys, resource; sys.path.insert(0, {str(ROOT)!r}); "
            "import dist_hooks.tools.consolidate; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-mb", type=float, default=200.0, help="uncompressed snapshot data")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--systems", type=int, default=64, help="systems per rank")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed (copytree, consolidate) pairs per variant")
    p.add_argument("--dir", default=None, help="where to build (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    atoms_per_system = 36  # mean of 8..64
    bytes_per_atom = 3 * 12 + 8 + 4  # positions, velocities, forces, numbers, masses
    steps = max(int(args.raw_mb * 1e6 / (args.ranks * args.systems * atoms_per_system
                                         * bytes_per_atom)), 2)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_consolidate_"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        run = base / "run"
        shutil.rmtree(run, ignore_errors=True)  # a run left in --dir would be appended to
        t0 = time.perf_counter()
        make_synthetic_run(run, ranks=args.ranks, steps=steps, systems=args.systems,
                           min_atoms=8, max_atoms=64, steps_per_append=16)
        build_s = time.perf_counter() - t0
        src_bytes = tree_bytes(run / "data.zarr") + tree_bytes(run / "logs")

        res = {}
        variants = {"consolidate": dict(parquet=False, checksums=True),
                    "consolidate --no-checksums": dict(parquet=False, checksums=False),
                    "consolidate+parquet": dict(parquet=True, checksums=True)}
        for key, kw in variants.items():
            res[key] = run_child(run, base / "out", trace=False, repeat=args.repeat, **kw)["pairs"]
        traced = run_child(run, base / "out", parquet=True, trace=True)
        out_bytes = tree_bytes(base / "out")
        base_rss = baseline_rss()
        report = {
            "ranks": args.ranks, "systems_per_rank": args.systems, "steps": steps,
            "raw_snapshot_mb": round(steps * args.ranks * args.systems * atoms_per_system
                                     * bytes_per_atom / 1e6, 1),
            "source_on_disk_mb": round(src_bytes / 1e6, 1),
            "output_on_disk_mb": round(out_bytes / 1e6, 1),
            "build_s": round(build_s, 2),
        }
        copies = [c for pairs in res.values() for c, _ in pairs]
        copy_s = min(copies)
        report.update({"copytree_s": round(copy_s, 3), "copytree_s_range": _span(copies),
                       "copytree_mb_s": round(src_bytes / 1e6 / copy_s, 1)})
        for key, pairs in res.items():
            best = min(t for _, t in pairs)
            ratios = sorted(c / t for c, t in pairs)
            report[f"{key}_s"] = round(best, 3)
            report[f"{key}_s_range"] = _span([t for _, t in pairs])
            report[f"{key}_mb_s"] = round(src_bytes / 1e6 / best, 1)
            # each consolidate against the copy timed just before it; the median of those
            report[f"{key}_vs_copytree"] = round(float(np.median(ratios)), 2)
            report[f"{key}_vs_copytree_range"] = _span(ratios, 2)
            if args.json:  # the raw (copytree s, consolidate s) pairs
                report[f"{key}_pairs"] = [[round(c, 3), round(t, 3)] for c, t in pairs]
        report["peak_rss_mb"] = round(traced["maxrss"] / 1e6, 1)
        report["baseline_rss_mb (imports only)"] = round(base_rss / 1e6, 1)
        report["tracemalloc_peak_mb"] = round(traced["tracemalloc_peak"] / 1e6, 1)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            for k, v in report.items():
                print(f"{k:>34}: {v}")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

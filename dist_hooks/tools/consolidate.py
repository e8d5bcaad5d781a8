"""``dist-hooks consolidate``: one group per hook, one converged group and one CSV per log.

A run leaves one Zarr group per rank and hook and one CSV per rank and log, which is what lets
every rank write without coordination. Analysis wants the opposite: one table. This module
merges them, reading only what the last checkpoint boundary committed.

How, and why:

* Records (and CSV rows) are merged as sorted streams. Each rank's records were appended in
  step order, so the ranks are merged like sorted runs: a window holds every buffered row whose
  step is below the *frontier* (the smallest last-buffered step of any rank not yet exhausted),
  is ordered by (step, rank, sample_id) with one ``np.lexsort`` and written out. Memory is
  bounded by one read block per rank plus one step's records, whatever the run's size.
* A trajectory's atom rows (nearly all the bytes) are not reordered: the consolidated group
  keeps each rank's rows as one segment, and records point into it (``atoms_start``,
  ``n_atoms``; format in docs/format.md). Whole shard files are copied, each checked against the
  checksum its writer recorded at the boundaries, or decoded and checked against the committed
  crc32 when it has none (:mod:`.atom_segments`). That is what brought consolidate from a
  twentieth of a file copy's speed to about half of it or more (docs/performance.md).
* Everything read is checked on the way: every field's crc32, every CSV's checksum and row
  count; a mismatch aborts before anything is published.
* The CSV logs, the atom files, the converged group and the records run side by side in
  threads (each releases the GIL for most of its time). Each merge runs in one thread: reading
  ahead in a second one cost more in handing the GIL back and forth than it overlapped
  (measured: 10% slower on 200 MB and on 1 GB).
* Crash safety: everything is written into a hidden temporary directory next to the output,
  fsynced, completed with ``consolidated.json`` (the marker readers require) and renamed into
  place; a killed consolidate leaves only the temporary, which the next one removes.
* Idempotent: an output whose marker names the current ``run.json`` (crc32) and the same
  options is left untouched; a forced rebuild writes the same bytes (no timestamps inside).
* One consolidate per run at a time: ``fcntl.flock`` on ``RUN/.consolidate.lock``.
* The output is plain Zarr v3 + CSV (+ Parquet): readable with ``zarr`` and ``pandas`` alone.
* Node-local runs: each rank's files are read from its *rank root* (``rank_roots``).
* The converged group is the coordinator's ``data.zarr/converged`` when the boundary's checksums
  of it (``merged.crc32``) show it intact and it is in (step, rank, sample_id) order, as it is
  unless ranks reached their last boundaries at different steps; otherwise it is rebuilt from the
  ranks' converged groups, merged and de-duplicated as the coordinator does. The output is the
  same either way. Runs recorded before merged checksums existed are rebuilt; without the
  ranks' groups (``storage="local"`` without rank roots) the merged group is all there is.

Where the parts live: the record stream read from a group (:mod:`.record_source`), the output
groups (:mod:`.output_groups`, atom rows copied by :mod:`.atom_segments`), the CSV merge
(:mod:`.csv_merge`), the lock and the temporary directory (:mod:`.staging`); this module plans
and runs them.

Output layout (``OUT``, default ``RUN/consolidated``)::

    OUT/consolidated.json          completion marker and summary (written last)
    OUT/data.zarr/hooks/<hook>     every snapshot hook: all ranks, indexed layout, ``rank`` column
    OUT/data.zarr/converged        converged records, one per (rank, sample_id), CSR layout
    OUT/logs/<hook>.csv            every CSV log: all ranks, committed rows
    OUT/logs/<hook>.parquet        the same, typed (when pyarrow.parquet is importable)
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from ..errors import DamageError
from ..store.manifest import Manifest
from ..reader import (
    CONSOLIDATED_FORMAT,
    CONSOLIDATED_MARKER,
    Unit,
    committed_files,
    committed_units,
    default_consolidated_dir,
    find_rank_roots,
    local_storage_error,
    manifest_snapshot,
    read_consolidated_summary,
    run_damage,
)
from ..records import CsrBlock, merge_blocks
from ..store import layout
from ..store.atomic_store import AtomicLocalStore, atomic_write_bytes, sync_dir
from ..store.raw_group_writer import consolidate_metadata
from .csv_merge import merge_csv, write_parquet
from .mirror import is_url
from .output_groups import GroupSink, TrajectoryOutput, _out_chunking
from .progress import Progress
from .record_source import DEFAULT_BLOCK_ATOMS, DEFAULT_BLOCK_RECORDS, ZarrSource, fetch_bytes_for
from .staging import check_out, new_temporary, publish, remove_stale, run_lock
from .verify import quick_unit_problems, verify_run

__all__ = ["consolidate"]

#: 2: trajectory groups in the indexed layout (atom rows as per-rank segments).
CONSOLIDATED_VERSION = 2

#: Called after each piece of output is written (a merged window of records or CSV rows, a
#: converged block, a piece of atom rows). ``None`` in production; a test seam, which the test
#: that kills a consolidate midway sets (tests/mp/consolidate_killed.py).
on_window: Callable[[], None] | None = None


def consolidate(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                skip_damaged: bool = False, force: bool = False, progress: bool | None = None,
                parquet: bool = True, block_records: int = DEFAULT_BLOCK_RECORDS,
                block_atoms: int = DEFAULT_BLOCK_ATOMS, checksums: bool = True,
                rank_roots: Sequence[str | os.PathLike] = (),
                cache: str | os.PathLike | None = None,
                storage_options: dict[str, Any] | None = None) -> dict:
    """Consolidate ``run_dir`` into ``out`` (default ``RUN/consolidated``); see the module doc.

    Returns the summary (``status``: "written" or "up-to-date"). Raises :class:`DamageError`
    when committed data are damaged (unless ``skip_damaged``: damaged (rank, hook) parts are
    left out and listed under ``skipped``), :class:`LockHeldError` when another consolidate of
    the run is running, :class:`RunError` for a path that is not a run.

    ``checksums=False`` skips decoding the trajectories' atom rows to compare them with their
    committed crc32 (whole shard files are then copied after only their index is checked;
    records, converged groups and CSVs are still checked in full): for a run already checked
    with ``dist-hooks verify``, or when the copy's speed matters more.

    ``rank_roots``: for a run recorded with ``storage="local"``, the directories that hold the
    nodes' local files (copied or mounted; see :func:`~dist_hooks.reader.find_rank_roots`).

    ``run_dir`` and ``out`` may be ``s3://`` URLs (:mod:`.s3_output`: built locally, uploaded
    with the marker last; an ``s3://`` run's default output is ``RUN/consolidated`` in the
    store); ``cache`` and ``storage_options`` as for :func:`~dist_hooks.reader.open_run`.
    """
    if is_url(run_dir) or is_url(out):
        from .s3_output import consolidate_remote
        return consolidate_remote(
            consolidate, run_dir, out, cache=cache, storage_options=storage_options,
            progress=progress, skip_damaged=skip_damaged, force=force, parquet=parquet,
            block_records=block_records, block_atoms=block_atoms, checksums=checksums,
            rank_roots=rank_roots)
    run_dir = Path(run_dir)
    # "not a run", a damaged manifest, a run inconsistent as a whole: refused before anything
    # is created (checked again below on the snapshot consolidated, under the lock)
    _check_run(run_dir, manifest_snapshot(run_dir)[0])
    out = Path(out) if out is not None else default_consolidated_dir(run_dir)
    check_out(run_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"skip_damaged": bool(skip_damaged), "parquet": bool(parquet),
               "checksums": bool(checksums),
               "rank_roots": [str(Path(r).resolve()) for r in rank_roots]}
    with run_lock(run_dir, out):
        remove_stale(out)
        manifest, mcrc = manifest_snapshot(run_dir)  # one read: parse and fingerprint agree
        _check_run(run_dir, manifest)
        try:
            old = read_consolidated_summary(out)
        except DamageError:
            old = None  # a damaged previous output is rebuilt
        if (old is not None and not force and old.get("options") == options
                and old.get("format_version") == CONSOLIDATED_VERSION
                and old.get("source", {}).get("manifest_crc32") == mcrc):
            return {**old, "status": "up-to-date", "out": str(out)}
        units = committed_units(manifest)
        roots = find_rank_roots(run_dir, manifest, rank_roots)
        if manifest.storage == "local" and not rank_roots and units:
            raise local_storage_error(run_dir, sorted({u.rank for u in units}))
        units, skipped = _usable_units(run_dir, manifest, units, roots, skip_damaged,
                                       rank_roots)
        tmp = new_temporary(out)
        try:
            summary = _build(run_dir, manifest, units, tmp, progress=progress, parquet=parquet,
                             block_records=block_records, block_atoms=block_atoms,
                             checksums=checksums, roots=roots)
            summary.update({
                "format": CONSOLIDATED_FORMAT, "format_version": CONSOLIDATED_VERSION,
                "complete": True, "options": options, "skipped": skipped,
                "source": {"manifest_crc32": mcrc, "relative": os.path.relpath(run_dir.resolve(),
                                                                               out.resolve()),
                           "boundary": manifest.last.index if manifest.last else None,
                           "world_size": manifest.world_size},
                "manifest": manifest.to_json()})
            atomic_write_bytes(tmp / CONSOLIDATED_MARKER,
                               json.dumps(summary, indent=1, sort_keys=True).encode())
            sync_dir(tmp)
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {**summary, "status": "written", "out": str(out)}


def _check_run(run_dir: Path, manifest: Manifest) -> None:
    """The run-wide checks ``verify`` makes (:func:`~dist_hooks.reader.run_problems`); not
    skippable with ``--skip-damaged``: they belong to no (rank, hook) part."""
    exc = run_damage(run_dir, manifest, "consolidate")
    if exc is not None:
        raise exc


def _usable_units(run_dir: Path, manifest: Manifest, units: list[Unit], roots: dict[int, Path],
                  skip_damaged: bool, rank_roots: Sequence[str | os.PathLike],
                  ) -> tuple[list[Unit], list[str]]:
    """The units to consolidate and the damage left out. With ``skip_damaged`` the run is
    verified first and every damaged (rank, hook) dropped; otherwise only the cheap structural
    checks run here (paths, files present and long enough), and anything deeper is found
    while streaming (checksums), refusing the whole consolidate."""
    if skip_damaged:
        report = verify_run(run_dir, manifest=manifest, check_merged=False,
                            rank_roots=rank_roots)
        bad = {(p["rank"], p["hook"]) for p in report["problems"] if p.get("hook")}
        return ([u for u in units if (u.rank, u.hook) not in bad],
                [p["message"] for p in report["problems"]])
    problems = [p for u in units for p in quick_unit_problems(roots.get(u.rank), u)]
    if problems:
        raise DamageError(_refusal(run_dir, problems), problems)
    return units, []


def _refusal(run_dir: Path, problems: list[str]) -> str:
    head = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (f"refusing to consolidate {run_dir}: committed data are damaged:\n  {head}{more}\n"
            f"(`dist-hooks verify {run_dir}` lists all damage; --skip-damaged leaves the damaged "
            f"parts out)")


# ------------------------------------------------------------------------------ the build
@dataclass
class _Inputs:
    """What one build reads and how; shared by its steps."""

    run_dir: Path
    manifest: Manifest
    units: list[Unit]
    roots: dict[int, Path]
    bar: Progress
    block_records: int
    block_atoms: int
    on_window: Callable[[], None] | None

    def root(self, u: Unit) -> Path:
        return self.roots.get(u.rank, self.run_dir)

    def zarr_units(self, *, converged: bool) -> list[Unit]:
        return [u for u in self.units if u.kind == "zarr" and bool(u.converged) == converged]

    def csv_units(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "csv"]

    def source(self, u: Unit, levels: tuple[str, ...] = ("record", "atom")) -> ZarrSource:
        """One rank's group, checked against its committed crc32s; the fetch size shrinks with
        the number of ranks merged at once."""
        u.path(self.root(u))
        n = sum(1 for v in self.units if v.kind == "zarr" and v.hook == u.hook)
        return ZarrSource(self.root(u) / layout.DATA_DIR, u.group, place=u.rel,
                          records=u.records, atoms=u.atoms, expect_crc=u.commit.crc32,
                          block_records=self.block_records, block_atoms=self.block_atoms,
                          progress=self.bar, fetch_bytes=fetch_bytes_for(n), levels=levels)


def _build(run_dir: Path, manifest: Manifest, units: list[Unit], tmp: Path, *,
           progress: bool | None, parquet: bool, block_records: int, block_atoms: int,
           checksums: bool = True, roots: dict[int, Path] | None = None) -> dict:
    """Write every output into ``tmp``; raise DamageError on checksum mismatches."""
    inputs = _Inputs(run_dir, manifest, units, roots or {},
                     Progress(0, "consolidate", enabled=progress), block_records, block_atoms,
                     on_window)
    store = _open_output(tmp)
    files = committed_files(run_dir, manifest) if checksums else {}
    n_trajectories = len({u.hook for u in inputs.zarr_units(converged=False)})
    pool = ThreadPoolExecutor(max_workers=2 + n_trajectories, thread_name_prefix="dist-hooks")
    try:
        summary, problems = _write_outputs(inputs, store, tmp, pool, files, parquet, checksums)
    except DamageError as exc:
        raise DamageError(_refusal(run_dir, exc.places), exc.places) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        inputs.bar.close()
    if problems:
        raise DamageError(_refusal(run_dir, problems), problems)
    _seal(store, tmp)
    return summary


def _open_output(tmp: Path) -> AtomicLocalStore:
    """The output's Zarr root in ``tmp``, with its format attributes and the hooks group."""
    store = AtomicLocalStore(tmp / layout.DATA_DIR, fsync="never")
    zroot = zarr.open_group(store, mode="w", zarr_format=3)
    zroot.attrs.update({"format": CONSOLIDATED_FORMAT, "format_version": CONSOLIDATED_VERSION})
    zroot.create_group(layout.CONSOLIDATED_HOOKS_GROUP)
    return store


def _write_outputs(inputs: _Inputs, store: AtomicLocalStore, tmp: Path, pool: ThreadPoolExecutor,
                   files: dict, parquet: bool, checksums: bool) -> tuple[dict, list[str]]:
    """Every output group and log; returns the summary's ``hooks``/``converged`` and the
    checksum mismatches found.

    Four kinds of work run side by side (each releases the GIL for most of its time): the CSV
    logs (pyarrow), the trajectories' atom files (copied, or decoded to be checked), the
    converged group and, here, the trajectories' records. The atom copies need only the
    manifest and the groups' metadata, so they start before any record source is opened.
    An error propagates as it is; the caller's pool shutdown waits for the others.
    """
    bar = inputs.bar
    logs = pool.submit(_merge_logs, inputs, tmp, parquet)
    trajectories = _start_trajectories(inputs, store, files, checksums, pool)
    conv = _converged_input(inputs)
    conv_job = pool.submit(_write_converged, inputs, store, conv)
    records = {h: [(u, inputs.source(u, ("record",))) for u in t.units]
               for h, t in trajectories.items()}
    bar.total = (sum(u.commit.bytes for u in inputs.csv_units())
                 + sum(s.nbytes for ss in records.values() for _, s in ss)
                 + sum(t.atom_bytes for t in trajectories.values())
                 + sum(s.nbytes for s in conv.sources))
    summary: dict[str, Any] = {"hooks": {}, "converged": None}
    problems: list[str] = []
    for h, t in trajectories.items():
        bar.set_label(f"consolidate {h}")
        summary["hooks"][h], more = t.finish(records[h])
        problems.extend(more)
    if conv.sources:
        bar.set_label("consolidate converged")
    summary["converged"], more = conv_job.result()
    problems.extend(more)
    if inputs.csv_units():
        bar.set_label("consolidate logs")
    csv_info, more = logs.result()
    summary["hooks"].update(csv_info)
    problems.extend(more)
    return summary, problems


def _merge_logs(inputs: _Inputs, tmp: Path, parquet: bool) -> tuple[dict, list[str]]:
    """Every CSV log merged into ``tmp/logs`` (+ its Parquet copy); their summary entries."""
    out, found = {}, []
    for h in sorted({u.hook for u in inputs.csv_units()}):
        us = [u for u in inputs.csv_units() if u.hook == h]
        csv_rel = layout.consolidated_log(h)
        pq_rel = layout.consolidated_log(h, ".parquet")
        res = merge_csv(us, {u.rank: inputs.root(u) for u in us}, tmp / csv_rel,
                        progress=inputs.bar, on_window=inputs.on_window,
                        parquet_out=tmp / pq_rel if parquet else None)
        found.extend(res["problems"])
        # the copy written beside the merge, or (a column's type widened) from the merged CSV
        has_pq = parquet and res["columns"] and (res["parquet"] or write_parquet(
            tmp / csv_rel, tmp / pq_rel, res["columns"], res["kinds"]))
        out[h] = {"kind": "csv", "csv": csv_rel, "parquet": pq_rel if has_pq else None,
                  "rows": res["rows"], "columns": res["columns"], "types": res["kinds"],
                  "bytes": (tmp / csv_rel).stat().st_size, "crc32": res["crc32"],
                  "ranks": [u.rank for u in us]}
    return out, found


def _start_trajectories(inputs: _Inputs, store: AtomicLocalStore, files: dict, checksums: bool,
                        pool: ThreadPoolExecutor) -> dict[str, TrajectoryOutput]:
    """One output per snapshot hook, its atom rows already being copied in ``pool``."""
    out = {}
    for h in sorted({u.hook for u in inputs.zarr_units(converged=False)}):
        us = [u for u in inputs.zarr_units(converged=False) if u.hook == h]
        t = TrajectoryOutput(store, layout.consolidated_group(h), us, inputs.root, files, inputs.bar,
                             inputs.on_window, checksums)
        t.start(pool)
        out[h] = t
    return out


@dataclass
class _ConvergedInput:
    """Where the converged group comes from: the coordinator's merged group (``merged``), or
    the ranks' converged groups merged and de-duplicated on (rank, sample_id) as the
    coordinator does (``ranks``). ``chunking_of`` and ``records`` size the output the same way
    in both cases, so that both give the same bytes."""

    ranks: list[tuple[int, ZarrSource]]
    merged: ZarrSource | None
    rank_ids: list[int]
    chunking_of: ZarrSource | None
    records: int

    @property
    def sources(self) -> list[ZarrSource]:
        return [s for _, s in self.ranks] or ([self.merged] if self.merged is not None else [])

    def blocks(self) -> Iterator[CsrBlock]:
        return merge_blocks(self.ranks, dedup=True) if self.ranks else iter(self.merged)


def _converged_input(inputs: _Inputs) -> _ConvergedInput:
    conv = inputs.zarr_units(converged=True)
    merged = inputs.manifest.merged
    ids = [u.rank for u in conv]
    if not conv and inputs.manifest.storage == "local" and merged.records:
        # rank data stayed on the nodes: the coordinator's merged group is all there is here
        src = _merged_source(inputs, merged.crc32, progress=inputs.bar)
        return _ConvergedInput([], src, [], src, merged.records)
    # the merged group holds every rank's records: usable only when none was left out
    every = len(conv) == sum(1 for u in committed_units(inputs.manifest)
                             if u.kind == "zarr" and u.converged)
    if (conv and every and merged.records and merged.crc32 is not None
            and _merged_is_intact(_merged_source(inputs, merged.crc32))):
        return _ConvergedInput([], _merged_source(inputs, merged.crc32, progress=inputs.bar), ids,
                               inputs.source(conv[0]), sum(u.records for u in conv))
    ranks = [(u.rank, inputs.source(u)) for u in conv]
    return _ConvergedInput(ranks, None, ids, ranks[0][1] if ranks else None,
                           sum(u.records for u in conv))


def _merged_source(inputs: _Inputs, expect_crc: dict[str, int] | None,
                   progress: Progress | None = None) -> ZarrSource:
    """The coordinator's merged group; ``progress``: for the reading that is copied (the
    bar's total counts it once)."""
    merged = inputs.manifest.merged
    return ZarrSource(inputs.run_dir / layout.DATA_DIR, layout.CONVERGED_GROUP,
                      place=f"{layout.DATA_DIR}/{layout.CONVERGED_GROUP}", records=merged.records,
                      atoms=merged.atoms, expect_crc=expect_crc,
                      block_records=inputs.block_records, block_atoms=inputs.block_atoms,
                      progress=progress)


def _merged_is_intact(src: ZarrSource) -> bool:
    """The merged group matches its committed checksums and is in (step, rank, sample_id)
    order (one pass over a group of one record per system: small)."""
    last: tuple[int, int, int] | None = None
    try:
        for b in src:
            keys = np.stack([b.rec["step"], b.rec["rank"], b.rec["sample_id"]], axis=1)
            if last is not None:
                keys = np.concatenate([np.asarray([last]), keys])
            d = np.diff(keys, axis=0)
            # each row's first non-zero difference must be positive (lexicographic order)
            first = np.take_along_axis(d, np.argmax(d != 0, axis=1)[:, None], axis=1)[:, 0]
            if (first < 0).any():
                return False
            last = tuple(int(x) for x in keys[-1])
    except DamageError:
        return False
    return not src.problems()


def _write_converged(inputs: _Inputs, store: AtomicLocalStore,
                     conv: _ConvergedInput) -> tuple[dict | None, list[str]]:
    """The converged group; in the pool, beside the trajectories (it was a sixth of a small
    run's time when it came after them, with the other threads idle)."""
    if not conv.sources:
        return None, []
    sink = GroupSink(store, layout.CONVERGED_GROUP,
                     _out_chunking(conv.chunking_of.chunking(), conv.records))
    for block in conv.blocks():
        sink.append(block)
        if inputs.on_window is not None:
            inputs.on_window()
    found = [p for s in conv.sources for p in s.problems()]
    info = {**sink.close(), "ranks": conv.rank_ids}
    # to disk now, with whatever else was written so far: the last sync, on the critical path
    # after the trajectories, then has less to do
    store.sync()
    return info, found


def _seal(store: AtomicLocalStore, tmp: Path) -> None:
    """Consolidated Zarr metadata at the output root, then everything to disk. The output
    never changes after it is written, so (unlike a live run's) its consolidated metadata
    cannot go stale, and ``zarr.open_group`` is one read; written from the nodes' documents
    (:func:`~dist_hooks.store.raw_group_writer.consolidate_metadata`: the bytes zarr writes, without
    its cost)."""
    consolidate_metadata(store)
    store.sync()
    if (tmp / layout.LOGS_DIR).is_dir():
        sync_dir(tmp / layout.LOGS_DIR)

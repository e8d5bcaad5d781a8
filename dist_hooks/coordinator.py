"""The coordinator (rank 0): merges each boundary's converged records and commits the boundary.

Why a class of its own: it is the only code that writes ``run.json``, ``boundaries/`` and
``data.zarr/converged``, and it runs beside the simulation in a background thread, so its state
(the merged group's writer, the (rank, sample_id) keys merged so far) must not mix with the
per-rank state of :class:`~dist_hooks.run.Run`.

Call order (rank 0 only; ``Run`` drives it):

1. :meth:`Coordinator.resume` once, when the run continues an existing manifest (cuts the merged
   group back to the boundary in force and reloads its keys);
2. per boundary, after the commit records of all ranks were gathered: :meth:`commit_async`,
   and :meth:`join` before the next boundary (it re-raises a failure of the previous one).
   ``commit`` = merge the new converged records, write the boundary file, write ``run.json``
   (the commit point), refresh the consolidated metadata.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import zarr

from .errors import DamageError, RecorderError
from .records import CsrBlock, merge_blocks
from .store import layout
from .store.checksums import fold_column_crc32
from .store.group_reader import GroupReader
from .store.group_writer import GroupWriter
from .store.manifest import (
    BoundaryEntry,
    BoundarySummary,
    CommitRecord,
    DroppedHook,
    HookCommit,
    HookSettings,
    Manifest,
    MergedLengths,
)
from .store.storage import RunStorage

log = logging.getLogger("dist_hooks")

#: GroupWriter settings of ``sink_options`` that the merged group takes too.
MERGED_OPTIONS = ("chunk_records", "chunk_atoms", "chunks_per_shard", "compressor", "write_unit",
                  "fsync")


@dataclass
class BoundaryMessage:
    """What a rank sends the coordinator at a boundary: its commit record and, with node-local
    storage, the converged records it committed since the previous boundary (hook -> block)."""

    record: CommitRecord
    converged: dict[str, CsrBlock] = field(default_factory=dict)


def group_block(reader: GroupReader, start: int, stop: int) -> CsrBlock:
    """Records ``[start, stop)`` of a record group as one block."""
    return CsrBlock.from_columns(reader.records(start, stop),
                                 {k: v[0] for k, v in reader.fields.items()})


class Coordinator:
    """Rank 0's part of the boundaries of one run (see module docstring).

    ``storage``: the run directory; ``shared``: the ranks' groups are under it (else they come in
    the messages); ``sink_options``: the run's Zarr settings, which the merged group takes too.
    """

    #: Test seam: called with the boundary index just before ``run.json`` is written (a test
    #: kills the process there to show that the previous boundary stays in force).
    before_commit: ClassVar[Callable[[int], None] | None] = None

    def __init__(self, storage: RunStorage, *, shared: bool, sink_options: dict[str, Any]) -> None:
        self.storage = storage
        self.shared = shared
        self.merged_options = {k: v for k, v in sink_options.items() if k in MERGED_OPTIONS}
        if "shards" in sink_options and "chunks_per_shard" not in self.merged_options:
            self.merged_options["chunks_per_shard"] = sink_options["shards"]
        self._writer: GroupWriter | None = None
        self._seen: dict[int, np.ndarray] = {}  # rank -> sample ids merged so far (sorted)
        self._crc: dict[str, int] = {}  # per field, of the merged group's rows so far
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_commit_s: float | None = None

    @property
    def writer(self) -> GroupWriter:
        """The writer of ``data.zarr/converged`` (created on first use)."""
        if self._writer is None:
            opts = dict(self.merged_options)
            store = self.storage.zarr_store(fsync=opts.pop("fsync", "replace"))
            self._writer = GroupWriter(store, layout.CONVERGED_GROUP, **opts)
        return self._writer

    def resume(self, merged: MergedLengths) -> None:
        """Cut the merged group back to the committed ``merged`` lengths; reload its keys."""
        self.writer.truncate(merged.records, merged.atoms)
        if merged.records:
            rd = GroupReader(self.storage.zarr_store(), layout.CONVERGED_GROUP)
            rank, sid = rd.column("rank"), rd.column("sample_id")
            self._seen = {int(r): np.unique(sid[rank == r]) for r in np.unique(rank).tolist()}
            if merged.crc32 is None:  # recorded before merged checksums: take them now
                block = group_block(rd, 0, merged.records)
                fold_column_crc32(self._crc, {**block.rec, **block.atoms})
        self._crc = dict(merged.crc32) if merged.crc32 is not None else self._crc

    # -- one boundary
    def commit_async(self, manifest: Manifest, messages: list[BoundaryMessage], index: int,
                     all_final: bool, hooks: dict[str, HookSettings]) -> None:
        """Start committing boundary ``index`` in the background; :meth:`join` waits for it."""
        self._thread = threading.Thread(target=self._commit_safely,
                                        args=(manifest, messages, index, all_final, hooks),
                                        name="dist_hooks-coordinator", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the boundary being committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RecorderError(f"coordinator (rank 0) failed to commit a boundary of "
                               f"{self.storage}: {type(err).__name__}: {err}; the previous "
                               "boundary stays in force") from err

    def _commit_safely(self, *args: Any) -> None:
        try:
            t = time.perf_counter()
            self.commit(*args)
            self.last_commit_s = time.perf_counter() - t
        except BaseException as exc:  # noqa: BLE001 - re-raised in the simulation thread
            self._error = exc

    def commit(self, manifest: Manifest, messages: list[BoundaryMessage], index: int,
               all_final: bool, hooks: dict[str, HookSettings]) -> None:
        """Merge, write the boundary file, then ``run.json`` (the commit point); in place on
        ``manifest``."""
        merged = self._merge(messages, manifest.last)
        records = [m.record for m in messages]
        entry = BoundaryEntry(index, time.time(), all_final, [r.step for r in records], records,
                              merged)
        rel = layout.boundary_file(index)
        self.storage.replace(rel, json.dumps(entry.to_json(), indent=1).encode())
        manifest.boundaries.append(BoundarySummary(entry.index, entry.time, _step_range(entry.steps),
                                                   rel, merged.records, all_final))
        manifest.hooks = dict(hooks)
        _record_dropped(manifest, records, index)
        manifest.last = entry
        if Coordinator.before_commit is not None:
            Coordinator.before_commit(index)
        self.storage.commit_manifest(manifest.encode())
        self._consolidate_metadata()

    def _merge(self, messages: list[BoundaryMessage], prev: BoundaryEntry | None) -> MergedLengths:
        """Append the converged records committed since ``prev`` by all ranks to the merged
        group, in (step, rank, sample_id) order, each (rank, sample_id) once."""
        sources: list[tuple[int, list[CsrBlock]]] = []
        for msg in messages:
            rec = msg.record
            before = prev.rank(rec.rank) if prev is not None else None
            for name, c in rec.hooks.items():
                if not c.converged:
                    continue
                old = before.hooks.get(name) if before is not None else None
                start, stop = (old.length if old is not None else 0), c.length
                if stop > start:
                    sources.append((rec.rank, [self._new_block(msg, name, start, stop)]))
        for block in merge_blocks(sources, dedup=True, seen=self._seen):
            self.writer.append(block.rec, block.atoms, np.diff(block.ptr))
            fold_column_crc32(self._crc, {**block.rec, **block.atoms})
        self.writer.sync()  # durable (fsync) before run.json names these lengths
        return MergedLengths(**self.writer.committed_lengths(), crc32=dict(self._crc))

    def _new_block(self, msg: BoundaryMessage, name: str, start: int, stop: int) -> CsrBlock:
        if not self.shared:
            return msg.converged[name]
        r = msg.record.rank
        reader = GroupReader(self.storage.zarr_store(), layout.hook_group(r, name),
                             limit_records=stop)
        if len(reader) < stop:
            raise DamageError(f"rank {r} committed {stop} records in {name!r} but only "
                               f"{len(reader)} are visible under {self.storage.url()}: storage='shared' "
                               "needs one filesystem that every rank writes and rank 0 reads")
        return group_block(reader, start, stop)

    def _consolidate_metadata(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                zarr.consolidate_metadata(self.storage.zarr_store())
            except Exception as exc:  # noqa: BLE001 - live readers open without it; say so and go on
                log.warning("consolidating metadata of %s failed: %s", self.storage, exc)


def _step_range(steps: list[int | None]) -> list[int | None]:
    """``[min, max]`` of the ranks' boundary steps (``[None, None]`` when no rank saw a step)."""
    known = [s for s in steps if s is not None]
    return [min(known), max(known)] if known else [None, None]


def _record_dropped(manifest: Manifest, records: list[CommitRecord], index: int) -> None:
    """A hook a rank committed at the previous boundary and not at this one was dropped on a
    resume (``Run(drop_hooks=...)``; ``Run`` refuses any other way to lose one): say so in
    ``run.json``'s additive ``dropped`` list, with its last commit entries, so that what left
    the run stays on record (its files are left where they are)."""
    prev = manifest.last
    if prev is None:
        return
    now = {r.rank: r for r in records}
    gone: dict[str, dict[int, HookCommit]] = {}
    for old in prev.ranks:
        new = now.get(old.rank)
        for name, c in old.hooks.items():
            if new is not None and name not in new.hooks:
                gone.setdefault(name, {})[old.rank] = c
    if gone:
        manifest.dropped = [*(manifest.dropped or []),
                            *(DroppedHook(n, index, r) for n, r in gone.items())]

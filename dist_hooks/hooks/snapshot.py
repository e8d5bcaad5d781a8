"""``SnapshotHook`` and ``ConvergedSnapshotHook``: the full per-system state, appended to a Zarr group."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from .. import packing
from ..batch import BatchView
from ..errors import BatchError, SchemaChangedError
from ..store import GroupReader
from ..store.checksums import fold_column_crc32
from ..stages import Stage
from ..writer_runtime import HostBufferPool
from .base import RecordingHook, field_name_problem


class _RootedStore(Protocol):
    root: Path  # the Zarr root; ConvergedSnapshotHook reopens its group from it to resume


class RecordWriter(Protocol):
    """What a snapshot hook needs of one group writer (``store.GroupWriter``): append-only CSR
    records, cut back on resume, flushed and made durable at checkpoint boundaries."""

    group_path: str
    store: _RootedStore

    @property
    def lengths(self) -> dict[str, int]: ...
    def append(self, records: Mapping[str, Any], atoms: Mapping[str, Any], n_atoms: Any) -> None: ...
    def truncate(self, records: int, atoms: int) -> None: ...
    def flush(self) -> None: ...
    def sync(self) -> None: ...
    def committed_lengths(self) -> dict[str, int]: ...
    def take_file_checksums(self) -> dict[str, list[int]]: ...
    def close(self) -> None: ...


class RecordSink(Protocol):
    """What the snapshot hooks are given (``store.ZarrSink``): one group writer per rank and hook,
    created, or reopened to resume."""

    def writer(self, rank: int, hook_name: str, *,
               attrs: Mapping[str, Any] | None = None) -> RecordWriter: ...


class SnapshotHook(RecordingHook):
    """The full per-system state — every atom-level and system-level tensor, status and system id
    included, neighbour data excluded — appended to this rank's group of a ``ZarrSink``.

    One firing: the batch's tensors are staged device-to-device on the side stream (the compute
    stream waits only for that), then copied into one reused pinned buffer; the writer appends the
    records in CSR layout. Record columns: step, sample_id, graph_idx, status and the system fields
    (a trailing singleton axis, as in energy (B,1), is dropped); atom columns: the atom fields.
    """

    commit_kind = "zarr"
    #: record only the systems of ``ctx.converged_mask`` (and skip firings without one)
    converged_only = False
    _output: RecordWriter | None

    def __init__(self, sink: RecordSink, frequency: int = 1, stage: Any = Stage.AFTER_STEP, *,
                 name: str = "snapshots", rank: int | None = None, buffers: int = 4,
                 exclude: tuple[str, ...] = ()):
        super().__init__(frequency=frequency, stage=stage, name=name, rank=rank)
        self.sink = sink
        self.exclude = set(exclude)
        self._pool = HostBufferPool(buffers, pinned=True)
        self._schema: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] | None = None

    def _start(self, view: BatchView) -> None:
        super()._start(view)
        self._output = self.sink.writer(self.rank, self.name)
        self._schema = {name: (lvl, t.dtype, tuple(t.shape[1:])) for lvl, name, t in self._fields(view)}
        self._crc: dict[str, int] = {}
        rp = self._resume_point
        if rp is not None:  # a resumed run: cut back to what the last boundary committed
            self._output.truncate(int(rp.get("records", 0)), int(rp.get("atoms", 0)))
            self._crc = dict(rp.get("crc32", {}))

    def _check_view(self, view: BatchView) -> None:
        if self._schema is not None:
            return  # recorded fields are fixed by the first firing, checked then; _check_schema after
        for lvl, name, t in self._fields(view):
            problem = field_name_problem(name)
            if problem is None and packing.recorded_dtype(t.dtype) is None:
                problem = f"has dtype {t.dtype}, which numpy and Zarr cannot store"
            if problem is not None:
                hint = " (a batch's system_id becomes the sample_id column)" if name == "sample_id" else ""
                raise BatchError(f"{self.name}: batch field {name!r} ({lvl} level) {problem}{hint}; rename "
                                 f"it, or leave it out with exclude=({name!r},)")

    def _fields(self, view: BatchView):
        for name, t in view.atom_fields.items():
            if name not in self.exclude:
                yield "atom", name, t
        for name, t in view.system_fields.items():
            if name not in self.exclude and name not in ("status", "system_id"):
                yield "record", name, t

    def _check_schema(self, view: BatchView) -> dict[str, torch.Tensor]:
        got = {name: (lvl, t) for lvl, name, t in self._fields(view)}
        for name, (lvl, dtype, shape) in self._schema.items():
            if name not in got:
                raise SchemaChangedError(f"{self.name}: field {name!r} ({lvl} level, {dtype}, per-row shape "
                                        f"{shape}) was recorded before but is missing from this batch")
            t = got[name][1]
            if t.dtype != dtype or tuple(t.shape[1:]) != shape:
                raise SchemaChangedError(
                    f"{self.name}: field {name!r} changed from {dtype} per-row shape {shape} to {t.dtype} "
                    f"per-row shape {tuple(t.shape[1:])}")
        for name in got.keys() - self._schema.keys():
            self._warn_once("new:" + name, f"field {name!r} appeared after the first snapshot; not recorded")
        return {name: got[name][1] for name in self._schema}

    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if not self._should_fire(ctx, stage):
            return
        if self._channel is not None:
            self._channel.check()
        mask = None
        if self.converged_only:
            mask = getattr(ctx, "converged_mask", None)
            if mask is None:
                return
        view = self._view(ctx.batch)
        if view.num_systems == 0:
            return  # every system retired: no records for this firing
        if self._schema is None:
            self._start(view)
        fields = self._check_schema(view)
        step = int(getattr(ctx, "step_count", 0))
        tensors = {"_atoms_ptr": view.atoms_ptr, "_sample_id": view.sample_ids(), "_status": view.status()}
        if mask is not None:
            tensors["_mask"] = mask.reshape(-1).to(torch.bool)
        tensors.update(fields)
        slots, nbytes = packing.plan(tensors)
        buf = self._pool.acquire(nbytes, self._channel.check)
        # no_grad: a field that requires grad is copied, not added to the caller's autograd graph
        if self._streams.cuda:
            with self._streams.reading(), torch.no_grad():
                # stage on the device (in the recorded dtype: the same one copy); the compute
                # stream waits only for this
                tensors = {s.name: tensors[s.name].to(s.dtype, copy=True) for s in slots}
            with self._streams.copying():
                packing.copy_into(buf, slots, tensors)
                event = self._streams.event()
        else:
            with torch.no_grad():
                packing.copy_into(buf, slots, tensors)  # copy_ converts to the recorded dtype
            tensors, event = None, None
        # ``tensors`` (the staged clones) stay referenced by the job until the copy's event completed
        self._channel.submit(lambda: self._write(buf, slots, step, tensors), event)

    def _select(self, sample_id: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        return None  # all systems

    def _write(self, buf: torch.Tensor, slots: list, step: int, _keep: Any) -> None:
        try:
            cols = packing.unpack(buf, slots)
            ptr = cols.pop("_atoms_ptr")
            n_atoms = np.diff(ptr)
            records = {"step": np.full(n_atoms.shape[0], step, dtype=np.int64),
                       "sample_id": cols.pop("_sample_id"),
                       "graph_idx": np.arange(n_atoms.shape[0], dtype=np.int64),
                       "status": cols.pop("_status")}
            sel = self._select(records["sample_id"], cols.pop("_mask", None))
            atoms = {}
            for name, a in cols.items():
                if self._schema[name][0] == "atom":
                    atoms[name] = a
                else:
                    records[name] = a.reshape(a.shape[0], *a.shape[2:]) if a.shape[1:2] == (1,) and a.ndim == 2 else a
            if sel is not None:
                atom_sel = np.repeat(sel, n_atoms)
                records = {k: v[sel] for k, v in records.items()}
                atoms = {k: v[atom_sel] for k, v in atoms.items()}
                n_atoms = n_atoms[sel]
                if n_atoms.shape[0] == 0:
                    return
            # views into the host buffer are fine: append() copies what it keeps before returning,
            # and the buffer goes back to the pool only after that (finally, below)
            records = {k: np.ascontiguousarray(v) for k, v in records.items()}
            atoms = {k: np.ascontiguousarray(v) for k, v in atoms.items()}
            fold_column_crc32(self._crc, {**records, **atoms})  # each column's, in order
            self._output.append(records, atoms, n_atoms.astype(np.int64))
        finally:
            self._pool.release(buf)

    def _sync_files(self) -> dict:
        if self._output is None:
            return {}
        self._output.sync()
        return {"group": self._output.group_path, **self._output.committed_lengths(), "crc32": dict(self._crc),
                "files": self._output.take_file_checksums()}


class ConvergedSnapshotHook(SnapshotHook):
    """Like ``SnapshotHook``, but only the systems that converged, each written once — when it first
    converges — even if the engine keeps stepping converged systems and fires ON_CONVERGE again.

    The device side copies the batch with the fresh ``converged_mask``; the writer thread keeps the set
    of sample ids already written (restored from the store when a run resumes) and drops repeats, so
    the step path needs no host sync to find out which systems are new.
    """

    converged_only = True
    merges_converged = True

    def __init__(self, sink: RecordSink, frequency: int = 1, stage: Any = Stage.ON_CONVERGE, *,
                 name: str = "converged", rank: int | None = None, buffers: int = 4,
                 exclude: tuple[str, ...] = ()):
        super().__init__(sink, frequency, stage, name=name, rank=rank, buffers=buffers, exclude=exclude)
        self._written: np.ndarray | None = None

    def _select(self, sid: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if self._written is None:
            self._written = _existing_sample_ids(self._output)
        sel = mask & ~np.isin(sid, self._written)
        # a system converged twice within one batch slot list counts once (first position)
        new_ids, first = np.unique(sid[sel], return_index=True)
        keep = np.zeros_like(sel)
        keep[np.flatnonzero(sel)[first]] = True
        self._written = np.union1d(self._written, new_ids)
        return keep


def _existing_sample_ids(writer: RecordWriter) -> np.ndarray:
    """Sample ids already in this rank's converged group (a resumed run must not write them again)."""
    if not writer.lengths.get("records"):
        return np.empty(0, dtype=np.int64)
    writer.flush()
    return np.unique(GroupReader(writer.store.root, writer.group_path).column("sample_id"))

"""``SnapshotHook`` and ``ConvergedSnapshotHook``: the full per-system state, appended to a Zarr group."""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np
import torch

from .. import packing
from ..batch import BatchView
from ..errors import BatchError, SchemaChangedError
from ..store import GroupReader, RecordStore
from ..store.checksums import fold_column_crc32
from ..stages import Stage
from ..writer_runtime import HostBufferPool
from .base import RecordingHook, field_name_problem


class RecordWriter(Protocol):
    """What a snapshot hook needs of one group writer (``store.GroupWriter``): append-only CSR
    records, cut back on resume, flushed and made durable at checkpoint boundaries."""

    group_path: str
    store: RecordStore  # ConvergedSnapshotHook reopens its group through it to resume

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

    One firing costs about one launch (``packing``): one ``cat`` of every recorded tensor's bytes
    (kept uint8 views while the batch keeps its tensors) — on CPU straight into a reused host
    buffer; on CUDA into a device staging tensor on the compute stream, which the side stream,
    after one wait for it, copies into a reused pinned buffer. The writer thread turns the bytes
    into columns (ids, status and pointers to int64, bfloat16 to float32) and appends the records
    in CSR layout. Record columns: step, sample_id, graph_idx, status and the system fields
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
        self._staging: packing.Staging | None = None  # kept while the batch keeps its tensors

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
        given: dict[str, torch.Tensor] = {}
        if self.converged_only:
            mask = getattr(ctx, "converged_mask", None)
            if mask is None:
                return
            given["_mask"] = mask
        batch = ctx.batch
        staging, views = self._staging, None
        if staging is not None:
            try:  # the same tensors as last time (the usual case): no view, no check to redo
                views = staging.views(batch, given)
            except Exception:  # noqa: BLE001 - an odd batch container: the full path below decides
                views = None
        if views is None:
            staging = self._restage(batch, given)
            if staging is None:
                return  # every system retired: no records for this firing
            views = staging.first
        step = int(getattr(ctx, "step_count", 0))
        buf = self._pool.acquire(staging.nbytes, self._channel.check)
        if self._streams.cuda:
            # one kernel on the compute stream reads every field (later in-place updates queue
            # behind it); the side stream waits for it and moves the staged bytes in one copy
            staged = torch.cat(views)
            with self._streams.copying():
                buf[:staging.nbytes].copy_(staged, non_blocking=True)
                event = self._streams.event()
        else:
            torch.cat(views, out=buf[:staging.nbytes])
            staged, event = None, None
        # ``staged`` stays referenced by the job until the copy's event completed
        self._channel.submit(lambda: self._write(buf, staging.slots, step, staged), event)

    def _restage(self, batch: Any, given: dict[str, torch.Tensor]) -> packing.Staging | None:
        """The full path, at the first firing and whenever the batch no longer fits the kept
        staging (tensors of another shape, dtype or device): view the batch, check its fields
        against the schema, and lay out a new staging (None for an empty batch)."""
        view = self._view(batch)
        if view.num_systems == 0:
            return None
        if self._schema is None:
            self._start(view)
        fields = self._check_schema(view)
        tensors: dict[str, torch.Tensor] = {}
        attrs: dict[str, str] = {}
        ptr_attr = _ptr_attribute(batch, view)
        if ptr_attr is None:  # derived from batch_idx: computed again at every firing (no reuse)
            tensors["_atoms_ptr"] = view.atoms_ptr
        else:  # staged as the batch holds it; the writer converts to int64
            tensors["_atoms_ptr"], attrs["_atoms_ptr"] = getattr(batch, ptr_attr), ptr_attr
        for col, attr in (("_sample_id", "system_id"), ("_status", "status")):
            t = view.system_fields.get(attr)
            if t is not None:  # else the writer fills the column in (batch position; 0)
                tensors[col], attrs[col] = t, attr
        tensors.update(given)
        for name, t in fields.items():
            tensors[name], attrs[name] = t, name
        staging = packing.Staging(tensors, attrs, device=view.device, reuse=self._staging)
        # a derived pointer cannot be re-read from the batch: such a staging is never reused
        self._staging = staging if ptr_attr is not None else None
        return staging

    def _select(self, sample_id: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        return None  # all systems

    def _write(self, buf: torch.Tensor, slots: list, step: int, _keep: Any) -> None:
        try:
            cols = packing.unpack(buf, slots)
            ptr = cols.pop("_atoms_ptr").reshape(-1).astype(np.int64, copy=False)
            n_atoms = np.diff(ptr)
            n = n_atoms.shape[0]
            records = {"step": np.full(n, step, dtype=np.int64),
                       "sample_id": _first_column(cols.pop("_sample_id", None), n, np.arange),
                       "graph_idx": np.arange(n, dtype=np.int64),
                       "status": _first_column(cols.pop("_status", None), n, np.zeros)}
            mask = cols.pop("_mask", None)
            sel = self._select(records["sample_id"], None if mask is None else mask.reshape(-1).astype(bool))
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

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._staging = None  # let go of the batch's tensors it kept views of

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


def _ptr_attribute(batch: Any, view: BatchView) -> str | None:
    """The batch attribute that ``view.atoms_ptr`` was read from (``BatchView`` takes
    ``batch_ptr``, else ``ptr``), when it holds integers; None when the view derived it."""
    for attr in ("batch_ptr", "ptr"):
        t = getattr(batch, attr, None)
        if t is not None:
            ok = isinstance(t, torch.Tensor) and t.numel() == view.num_systems + 1
            return attr if ok and not t.is_floating_point() and not t.is_complex() else None
    return None


def _first_column(a: np.ndarray | None, n: int, default: Any) -> np.ndarray:
    """A per-system column as ``BatchView.sample_ids()``/``status()`` make it on the device: the
    first entry per row, as int64; ``default(n)`` (arange: the batch position; zeros) when absent."""
    if a is None:
        return default(n, dtype=np.int64)
    return (a.reshape(n, -1)[:, 0] if a.ndim > 1 else a).astype(np.int64, copy=False)


def _existing_sample_ids(writer: RecordWriter) -> np.ndarray:
    """Sample ids already in this rank's converged group (a resumed run must not write them again)."""
    if not writer.lengths.get("records"):
        return np.empty(0, dtype=np.int64)
    writer.flush()
    return np.unique(GroupReader(writer.store, writer.group_path).column("sample_id"))

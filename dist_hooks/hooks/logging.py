"""``LoggingHook``: per-system scalars reduced on the device, written in blocks by the writer thread."""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..batch import BatchView
from ..errors import BatchError, MissingDependencyError, SchemaChangedError
from ..store.csv_log import FLOAT_COLUMNS, INT_COLUMNS
from ..stages import Stage
from ..store.object_storage import is_url
from ..writer_runtime import HostBufferPool, log
from . import reductions
from .base import RecordingHook, column_name_problem
from .log_sinks import (CsvLogSink, CsvPlace, CustomLogSink, LogSink, TensorBoardLogSink,
                        check_writable_dir, is_csv_file_path)
from .reductions import REDUCED_FIELDS

DEFAULT_SCALARS = FLOAT_COLUMNS


class LoggingHook(RecordingHook):
    """Per-system scalars (step, rank, sample_id, graph_idx, status, energy, fmax, temperature and
    custom scalars), one row per system per firing.

    Values are reduced on the device into a ring of ``ring_size`` firings; one device-to-host copy per
    full ring (or flush) moves the block, and the writer encodes it in bulk. Values match
    nvalchemi's LoggingHook: fmax = max over atoms of ||F_i||, temperature = sum(m v^2) / (3 N k_B).

    ``reductions``: how the default scalars are computed (:mod:`.reductions`). ``"fused"``: one
    NVIDIA Warp kernel launch per firing (the ``fast`` extra; CPU and CUDA); ``"eager"``: torch
    ops, the reference; ``"auto"`` (default): fused when Warp is installed and takes the batch,
    else eager. ``reductions_used`` says which ran. Custom scalars are computed as given, after.

    Backends: ``"csv"`` (one file per rank, see ``log_path``), ``"tensorboard"`` (one run per rank:
    ``name/mean|min|max`` over the systems and, with ``per_system``, ``name/sample_<sample_id>``;
    ``per_system=None`` keeps those while a firing holds at most 64 systems), ``"custom"``
    (``writer_fn(step, rows)`` with rows a list of dicts, one per system; pass ``columnar=True`` to
    get one dict of numpy columns instead).

    Live logs: a CSV gets its header at the first firing, and rows reach the file (whole blocks,
    flushed) at least every ``flush_interval`` seconds, not only per full ring: a firing ships the
    ring early when its oldest row would be older than the interval at the next firing (one
    ``time.monotonic()`` per firing, no host sync). So while firings come at a steady pace, a
    live reader sees each row within ``flush_interval`` seconds (the first firing's at once); rows
    are shipped only at firings and boundaries. ``0`` or ``None``: per full ring only (and at every
    boundary, flush and close, as always).

    ``log_path``: a ``.csv`` path gets the rank inserted (``log.csv`` -> ``log.rank-00003.csv``); any
    other path is a directory holding ``rank-00003.csv``; ``{rank}`` in the path is formatted instead.
    Directories are created; an unwritable location fails at construction.

    Object storage (backend ``"csv"``): ``log_path="s3://bucket/prefix/logs/log"`` writes each
    rank's log there as immutable parts, one PUT per block (``store/log_parts.py``; the logical
    log is byte for byte the local CSV, and every part is a CSV of its own). Credentials and
    endpoint come from ``storage_options`` (``access_key_id``, ``secret_access_key``,
    ``endpoint``, ``region``, ...) or the ``AWS_*`` environment, and are never written anywhere;
    bad ones or a dead endpoint fail at construction.
    """

    commit_kind = "csv"
    _output: LogSink | None

    def __init__(self, backend: str = "csv", frequency: int = 1, log_path: str | os.PathLike | None = None,
                 custom_scalars: Mapping[str, Callable[[Any, Any], Any]] | None = None,
                 writer_fn: Callable[[int, Any], None] | None = None, stage: Any = Stage.AFTER_STEP, *,
                 name: str = "log", rank: int | None = None, ring_size: int = 64, buffers: int = 4,
                 columnar: bool = False, flush_interval: float | None = 5.0,
                 per_system: bool | None = None, reductions: reductions.Mode = "auto",
                 storage_options: dict[str, Any] | None = None):
        super().__init__(frequency=frequency, stage=stage, name=name, rank=rank)
        if backend not in ("csv", "tensorboard", "custom"):
            raise ValueError(f"backend must be 'csv', 'tensorboard' or 'custom', got {backend!r}")
        if backend == "custom" and writer_fn is None:
            raise ValueError("backend='custom' needs writer_fn(step, rows)")
        if backend != "custom" and writer_fn is not None:
            raise ValueError(f"writer_fn is only called with backend='custom' (got backend="
                             f"{backend!r}): pass backend='custom', or leave writer_fn out")
        if reductions not in _MODES:
            raise ValueError(f"reductions must be one of {_MODES}, got {reductions!r}")
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, got {ring_size}")
        if flush_interval is not None and not float(flush_interval) >= 0:
            raise ValueError(f"flush_interval must be >= 0 seconds or None, got {flush_interval}")
        self.backend = backend
        self.reductions = reductions
        self.writer_fn = writer_fn
        self.columnar = columnar
        self.custom_scalars = dict(custom_scalars or {})
        for key in self.custom_scalars:
            problem = column_name_problem(key) if isinstance(key, str) else "is not a string"
            if problem is not None:
                raise BatchError(f"{name}: custom scalar {key!r} {problem}; give it another name")
        self.ring_size = int(ring_size)
        self.flush_interval = float(flush_interval) if flush_interval else None
        self.per_system = per_system
        if log_path is None:
            log_path = Path("dist_hooks_logs") / name
        if storage_options and backend != "csv":
            raise ValueError(f"storage_options are for backend='csv' (a log on an object store), "
                             f"got backend={backend!r}")
        # a URL stays text (a Path would fold its '//'); a local path is a Path, as it was
        self.log_path: Path | str = log_path if is_url(log_path) else Path(log_path)
        #: backend "csv": where each rank's log lies (its storage opened now: fails early)
        self._place = CsvPlace(log_path, storage_options) if backend == "csv" else None
        if backend == "tensorboard":
            if isinstance(self.log_path, str):
                raise ValueError(f"backend='tensorboard' writes local files; log_path must be a "
                                 f"local directory, got {self.log_path!r}")
            check_writable_dir(self.log_path if not is_csv_file_path(self.log_path) else self.log_path.parent)
        # the backend, chosen here once; opened at the first firing, as _open_sink(rank)
        self._open_sink: Callable[[int], LogSink] = {
            "csv": partial(CsvLogSink, self._place),
            "tensorboard": partial(TensorBoardLogSink, self.log_path, per_system),
            "custom": partial(CustomLogSink, writer_fn, columnar),
        }[backend]
        self._pool = HostBufferPool(buffers, pinned=True)
        self._names: list[str] | None = None
        self._ring: torch.Tensor | None = None
        # CUDA: the ring a flush is copying out, and the event that says it is done; the next
        # flush switches back to it (rings alternate, so no firing waits for a copy)
        self._spare: tuple[torch.Tensor, Any] | None = None
        self._scalars: reductions.SystemScalars | None = None  # chosen per batch layout
        self._steps: list[int] = []
        # flush_interval: when the ring's first row was recorded, and the previous firing's time
        # (-inf: the first firing ships at once)
        self._first_t = self._prev_t = -float("inf")
        self.path: Path | str | None = None

    @property
    def reductions_used(self) -> str | None:
        """``"fused"`` or ``"eager"``: what reduced the last firing (None before the first)."""
        return None if self._scalars is None else self._scalars.name

    def rank_path(self, rank: int) -> Path | str | None:
        """The CSV that rank ``rank`` writes (backend ``"csv"``; None for the others): a local
        ``Path``, or the ``s3://`` URL of a log on an object store."""
        return self._place.path(rank) if self._place is not None else None

    def committed_path(self, rank: int) -> str | None:
        return self._place.url(rank) if self._place is not None else None

    # columns of the ring: sample_id, status, then the float scalars
    def _scalar_names(self) -> list[str]:
        return list(DEFAULT_SCALARS) + [k for k in self.custom_scalars if k not in DEFAULT_SCALARS]

    def _start(self, view: BatchView) -> None:
        super()._start(view)
        names = self._scalar_names()
        # what each default scalar needs and the batch lacks: energy, or the fields it reduces
        lacking = {"energy": [] if "energy" in view.system_fields else ["energy"],
                   **{k: [f for f in fields if f not in view.atom_fields]
                      for k, fields in REDUCED_FIELDS.items()}}
        self._missing = {k for k, gone in lacking.items() if gone and k not in self.custom_scalars}
        for k in sorted(self._missing):
            self._warn_once(k, f"batch has no {' or '.join(lacking[k])}: column {k!r} is left empty")
        self._output = self._open_sink(self.rank)
        self.path = self._output.path
        if self._resume_point is not None:  # a resumed run: cut back to what the last boundary committed
            self._output.resume(self._resume_point)
        # the header now, like the resume (before any block is queued): a reader finds a
        # parseable file from the first firing on, however busy the writer thread is
        self._output.start(list(INT_COLUMNS) + names)
        # started only now: a sink that failed to open or resume is tried again, never skipped
        self._names, self._custom_keys = names, tuple(self.custom_scalars)

    def _check_view(self, view: BatchView) -> None:
        bad = reductions.required_dtype_problem(view, self.custom_scalars)
        if bad is not None:
            scalar, f, dtype = bad
            raise BatchError(f"{self.name}: batch field {f!r} is {dtype}; {scalar} needs a floating-"
                             f"point {f!r} (or a custom scalar named {scalar!r} instead)")
        self._scalars = None  # a new layout: chosen again at the next reduction

    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if not self._should_fire(ctx, stage):
            return
        if self._channel is not None:
            self._channel.check()
        scalars, ring = self._scalars, self._ring
        # the steady state: the fused kernel launched again on the tensors it has bound (one
        # launch, no view, no torch op); anything else takes the full path
        if (scalars is None or ring is None or self.custom_scalars
                or not scalars.replay(ctx.batch, ring, len(self._steps))):
            if not self._reduce(ctx):
                return
        self._steps.append(int(getattr(ctx, "step_count", 0)))
        n, due = len(self._steps), False
        if self.flush_interval is not None:
            now = time.monotonic()
            if n == 1:
                self._first_t = now
            # due: the oldest row would be older than the interval at the next firing, expected
            # one firing period (now - previous firing) from now
            due = 2.0 * now - self._prev_t - self._first_t >= self.flush_interval
            self._prev_t = now
        if n == self.ring_size or due:
            self._flush_device()

    def _reduce(self, ctx: Any) -> bool:
        """The full path of a firing: view the batch, check it, (re)size the ring, choose the
        reduction for its layout and run it. False: nothing to record (an empty batch)."""
        view = self._view(ctx.batch)
        if view.num_systems == 0:
            return False  # every system retired: no rows for this firing
        if self._names is None:
            self._start(view)
        elif tuple(self.custom_scalars) != self._custom_keys:
            raise SchemaChangedError(f"{self.name}: custom scalars changed from {list(self._custom_keys)} to "
                             f"{list(self.custom_scalars)} after the first row was logged; a CSV keeps the "
                             "columns it started with — declare every custom scalar before the run")
        B = view.num_systems
        ring = self._ring
        if ring is not None and ring.shape[2] != B:
            self._flush_device()  # batch size changed: ship what we have, then resize the ring
            ring = self._ring = self._spare = None
        if ring is None:
            ring = self._ring = self._new_ring(view.device, B)
        n = len(self._steps)
        if self._scalars is None or not self._run_scalars(view, ctx, ring, n):
            self._scalars = _choose_scalars(
                self.reductions, view, frozenset(self._missing),
                frozenset(self.custom_scalars) & frozenset(DEFAULT_SCALARS), self.name)
            self._run_scalars(view, ctx, ring, n)  # the chosen one takes this batch
        return True

    def _run_scalars(self, view: BatchView, ctx: Any, ring: torch.Tensor, n: int) -> bool:
        if self.custom_scalars:
            return self._reduce_with_custom(view, ctx, ring, n)
        with torch.no_grad():  # never extend a caller's autograd graph
            return self._scalars(view, ring, n)

    def _new_ring(self, device: torch.device, systems: int) -> torch.Tensor:
        rows = 2 + len(self._names)
        return self._streams.protect(torch.empty(self.ring_size, rows, systems,
                                                 dtype=torch.float64, device=device))

    def _reduce_with_custom(self, view: BatchView, ctx: Any, ring: torch.Tensor, n: int) -> bool:
        """The default rows, then each custom scalar in the caller's grad mode, its result copied
        (a custom scalar named like a default one replaces it)."""
        grad = torch.is_grad_enabled()
        B = view.num_systems
        with torch.no_grad():
            if not self._scalars(view, ring, n):
                return False
            for row, name in enumerate(self._names, start=2):
                fn = self.custom_scalars.get(name)
                if fn is not None:
                    with torch.set_grad_enabled(grad):
                        value = fn(ctx.batch, getattr(ctx, "workflow", None))
                    _fill(ring[n, row], value, name, B)
        return True

    def _flush_device(self) -> None:
        """Ship the ring's rows: one device-to-host copy (CUDA: on the side stream, after the
        compute stream's reductions; the next firings write the other ring meanwhile)."""
        n = len(self._steps)
        if n == 0 or self._ring is None:
            return
        ring, steps = self._ring[:n], self._steps
        self._steps = []
        nbytes = ring.numel() * 8
        buf = self._pool.acquire(nbytes, self._channel.check)
        host = buf[:nbytes].view(torch.float64).view(ring.shape)
        streams = self._streams
        with streams.copying():
            host.copy_(ring, non_blocking=True)
            event = streams.event()
        if streams.cuda:  # alternate rings; reuse one only after its copy is done (device-side wait)
            spare, self._spare = self._spare, (self._ring, event)
            if spare is None:
                self._ring = self._new_ring(self._ring.device, self._ring.shape[2])
            else:
                self._ring = spare[0]
                streams.compute_waits(spare[1])
        self._channel.submit(lambda: self._write_block(buf, host, steps), event)

    def _write_block(self, buf: torch.Tensor, host: torch.Tensor, steps: list[int]) -> None:
        try:
            a = host.numpy()  # (n, C, B)
            n, _, B = a.shape
            ints = {"step": np.repeat(np.asarray(steps, dtype=np.int64), B),
                    "rank": np.full(n * B, self.rank, dtype=np.int64),
                    "sample_id": a[:, 0, :].reshape(-1).astype(np.int64),
                    "graph_idx": np.tile(np.arange(B, dtype=np.int64), n),
                    "status": a[:, 1, :].reshape(-1).astype(np.int64)}
            # the CSV schema's integer columns in its order, then the float scalars
            cols: dict[str, Any] = {k: ints[k] for k in INT_COLUMNS}
            for j, name in enumerate(self._names):
                cols[name] = None if name in self._missing else a[:, 2 + j, :].reshape(-1).copy()
            self._output.append(cols, steps)
            self._output.flush()  # whole blocks reach the reader, each as soon as it is written
        finally:
            self._pool.release(buf)

    def _sync_files(self) -> dict:
        return self._output.sync() if self._output is not None else {}


_MODES = reductions.MODES


def _choose_scalars(mode: reductions.Mode, view: BatchView, missing: frozenset[str],
                    replaced: frozenset[str], hook: str) -> reductions.SystemScalars:
    """The reduction for ``mode`` and this batch layout: ``"eager"`` always the reference;
    ``"fused"`` the Warp kernel, or an error when Warp is missing; ``"auto"`` the kernel when Warp
    is installed and takes the batch, else the reference. A batch the kernel does not take (a
    missing field, bfloat16, ...) falls back to the reference under ``"fused"`` too, with a
    warning: the values are the same, only the cost differs. ``missing``: default scalars whose
    fields the batch lacks (NaN); ``replaced``: those a custom scalar computes instead."""
    eager = reductions.EagerScalars(missing, replaced)
    if mode == "eager":
        return eager
    if not reductions.warp_available():
        if mode == "fused":
            raise MissingDependencyError(
                f"{hook}: reductions='fused' needs NVIDIA Warp: pip install 'dist_hooks[fast]' "
                "(warp-lang), or pass reductions='auto' to fall back to torch")
        return eager
    from .warp_scalars import FusedScalars  # noqa: PLC0415 - Warp is optional and slow to import

    fused = FusedScalars()
    if not missing and fused.accepts(view):
        return fused
    say = log.warning if mode == "fused" else log.info
    say("%s: the fused reduction does not take this batch (%s); reducing with torch ops",
        hook, f"no {', '.join(sorted(missing))}" if missing else fused.refusal(view))
    return eager


def _fill(dst: torch.Tensor, value: Any, name: str, B: int) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and B != 1:
            dst.fill_(value.reshape(()))
            return
        if value.numel() != B:
            raise BatchError(f"custom scalar {name!r} returned shape {tuple(value.shape)}; expected ({B},) "
                             "(one value per system) or a single value")
        dst.copy_(value.reshape(-1))
    else:
        dst.fill_(float(value))

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
from ..errors import BatchError, SchemaChangedError
from ..store.csv_log import FLOAT_COLUMNS, INT_COLUMNS
from ..stages import Stage
from ..writer_runtime import HostBufferPool
from .base import RecordingHook, column_name_problem
from .log_sinks import (CsvLogSink, CustomLogSink, LogSink, TensorBoardLogSink, check_writable_dir,
                        csv_rank_path, is_csv_file_path)

KB_EV_PER_K = 8.617333262e-5  # Boltzmann constant in eV/K, as nvalchemi uses it
DEFAULT_SCALARS = FLOAT_COLUMNS
#: the atom fields each default scalar reduces; they must be floating point (checked per layout)
REDUCED_FIELDS = {"fmax": ("forces",), "temperature": ("velocities", "atomic_masses")}
#: reduced in float32 instead of their own dtype (a row sum of squares in bfloat16 keeps ~3 digits)
_HALF = (torch.bfloat16, torch.float16)


class LoggingHook(RecordingHook):
    """Per-system scalars (step, rank, sample_id, graph_idx, status, energy, fmax, temperature and
    custom scalars), one row per system per firing.

    Values are reduced on the device into a ring of ``ring_size`` firings; one device-to-host copy per
    full ring (or flush) moves the block, and the writer encodes it in bulk. Values match
    nvalchemi's LoggingHook: fmax = max over atoms of ||F_i||, temperature = sum(m v^2) / (3 N k_B).

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
    """

    commit_kind = "csv"
    _output: LogSink | None

    def __init__(self, backend: str = "csv", frequency: int = 1, log_path: str | os.PathLike | None = None,
                 custom_scalars: Mapping[str, Callable[[Any, Any], Any]] | None = None,
                 writer_fn: Callable[[int, Any], None] | None = None, stage: Any = Stage.AFTER_STEP, *,
                 name: str = "log", rank: int | None = None, ring_size: int = 64, buffers: int = 4,
                 columnar: bool = False, flush_interval: float | None = 5.0,
                 per_system: bool | None = None):
        super().__init__(frequency=frequency, stage=stage, name=name, rank=rank)
        if backend not in ("csv", "tensorboard", "custom"):
            raise ValueError(f"backend must be 'csv', 'tensorboard' or 'custom', got {backend!r}")
        if backend == "custom" and writer_fn is None:
            raise ValueError("backend='custom' needs writer_fn(step, rows)")
        if backend != "custom" and writer_fn is not None:
            raise ValueError(f"writer_fn is only called with backend='custom' (got backend="
                             f"{backend!r}): pass backend='custom', or leave writer_fn out")
        if ring_size < 1:
            raise ValueError(f"ring_size must be >= 1, got {ring_size}")
        if flush_interval is not None and not float(flush_interval) >= 0:
            raise ValueError(f"flush_interval must be >= 0 seconds or None, got {flush_interval}")
        self.backend = backend
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
        self.log_path = Path(log_path) if log_path is not None else Path("dist_hooks_logs") / name
        if backend in ("csv", "tensorboard"):
            check_writable_dir(self.log_path if not is_csv_file_path(self.log_path) else self.log_path.parent)
        # the backend, chosen here once; opened at the first firing, as _open_sink(rank)
        self._open_sink: Callable[[int], LogSink] = {
            "csv": partial(CsvLogSink, self.log_path),
            "tensorboard": partial(TensorBoardLogSink, self.log_path, per_system),
            "custom": partial(CustomLogSink, writer_fn, columnar),
        }[backend]
        self._pool = HostBufferPool(buffers, pinned=True)
        self._names: list[str] | None = None
        self._ring: torch.Tensor | None = None
        self._steps: list[int] = []
        # flush_interval: when the ring's first row was recorded, and the previous firing's time
        # (-inf: the first firing ships at once)
        self._first_t = self._prev_t = -float("inf")
        self.path: Path | None = None
        self._ones: dict = {}

    def rank_path(self, rank: int) -> Path:
        """The CSV that rank ``rank`` writes (backend ``"csv"``)."""
        return csv_rank_path(self.log_path, rank)

    def committed_path(self, rank: int) -> Path | None:
        return self.rank_path(rank) if self.backend == "csv" else None

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
        for scalar, fields in REDUCED_FIELDS.items():
            if scalar in self.custom_scalars:
                continue
            for f in fields:
                t = view.atom_fields.get(f)
                if t is not None and not t.dtype.is_floating_point:
                    raise BatchError(f"{self.name}: batch field {f!r} is {t.dtype}; {scalar} needs a floating-"
                                     f"point {f!r} (or a custom scalar named {scalar!r} instead)")

    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if not self._should_fire(ctx, stage):
            return
        if self._channel is not None:
            self._channel.check()
        view = self._view(ctx.batch)
        if view.num_systems == 0:
            return  # every system retired: no rows for this firing
        if self._names is None:
            self._start(view)
        elif tuple(self.custom_scalars) != self._custom_keys:
            raise SchemaChangedError(f"{self.name}: custom scalars changed from {list(self._custom_keys)} to "
                             f"{list(self.custom_scalars)} after the first row was logged; a CSV keeps the "
                             "columns it started with — declare every custom scalar before the run")
        B = view.num_systems
        if self._ring is not None and self._ring.shape[2] != B:
            self._flush_device()  # batch size changed: ship what we have, then resize the ring
            self._ring = None
        if self._ring is None:
            self._ring = self._streams.protect(torch.empty(self.ring_size, 2 + len(self._names), B,
                                                           dtype=torch.float64, device=view.device))
        slot = self._ring[len(self._steps)]
        grad = torch.is_grad_enabled()
        with self._streams.reading(), torch.no_grad():  # never extend a caller's autograd graph
            self._reduce(view, ctx, slot, grad)
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

    def _reduce(self, view: BatchView, ctx: Any, out: torch.Tensor, grad: bool) -> None:
        """Write one firing's per-system values into ``out`` (C, B) on the current stream, under
        ``no_grad``; custom scalars run in the caller's grad mode ``grad``, their results copied."""
        B = view.num_systems
        seg = None
        out[0].copy_(view.sample_ids())
        out[1].copy_(view.status())
        row = 2
        for name in self._names:
            dst = out[row]
            row += 1
            fn = self.custom_scalars.get(name)
            if fn is not None:
                with torch.set_grad_enabled(grad):
                    value = fn(ctx.batch, getattr(ctx, "workflow", None))
                _fill(dst, value, name, B)
            elif name in self._missing:
                dst.fill_(float("nan"))
            elif name == "energy":
                dst.copy_(view.system_scalar("energy"))
            elif name == "fmax":
                # max of squared norms, square root of the B maxima only; (F*F) @ 1 is a fast row sum
                f = view.atom_fields["forces"]
                f = f.float() if f.dtype in _HALF else f
                seg = view.atom_to_system() if seg is None else seg
                f2 = (f * f) @ self._ones3(f)
                m2 = torch.zeros(B, dtype=f2.dtype, device=f2.device)
                m2.scatter_reduce_(0, seg, f2, "amax", include_self=False)
                dst.copy_(m2).sqrt_()
            elif name == "temperature":
                v = view.atom_fields["velocities"]
                v = v.float() if v.dtype in _HALF else v
                m = view.atom_fields["atomic_masses"].reshape(-1)
                mv2 = ((v * v) @ self._ones3(v)).mul_(m)
                seg = view.atom_to_system() if seg is None else seg
                dst.zero_().index_add_(0, seg, mv2.to(torch.float64))
                counts = (view.atoms_ptr[1:] - view.atoms_ptr[:-1]).to(torch.float64)
                dst.div_(counts.mul_(3.0 * KB_EV_PER_K))

    def _ones3(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        t = self._ones.get(key)
        if t is None:
            t = self._ones[key] = torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
        return t

    def _flush_device(self) -> None:
        n = len(self._steps)
        if n == 0 or self._ring is None:
            return
        ring, steps = self._ring[:n], self._steps
        self._steps = []
        nbytes = ring.numel() * 8
        buf = self._pool.acquire(nbytes, self._channel.check)
        host = buf[:nbytes].view(torch.float64).view(ring.shape)
        with self._streams.copying():
            host.copy_(ring, non_blocking=True)
            event = self._streams.event()
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

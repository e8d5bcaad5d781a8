"""The recording-hook base: what LoggingHook, SnapshotHook and ConvergedSnapshotHook share.

Protocol (../shared/design/seed-api.md): ``frequency``, ``stage``, ``__call__(ctx, stage)``; the
engine calls a hook when the stage matches and ``step_count % frequency == 0``. We re-check both in
``__call__`` so that a plain loop can call every hook at every step. Engines that never enter or close
their hooks are covered by lazy start on the first call, explicit ``flush()``/``close()`` and an
``atexit`` close.

The per-step call issues device work only (see ``writer_runtime.py``): no loop over systems, no host sync,
no text formatting. Encoding and disk I/O happen in the process's writer thread.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Protocol

import torch

from ..batch import BatchView
from ..launch import detect_launch
from ..store.layout import RESERVED_NAMES, name_problem
from ..stages import Stage, as_stage, stage_matches
from ..writer_runtime import Channel, Streams, register_for_exit

log = logging.getLogger("dist_hooks")


def resolve_rank(explicit: int | None) -> int:
    """The global rank of this process: explicit, else torch.distributed's, else the launcher's."""
    if explicit is not None:
        return int(explicit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return detect_launch().rank


def field_name_problem(name: str) -> str | None:
    """Why a batch field cannot be recorded under ``name`` in a record group, or None.

    A field becomes a Zarr array: its name is one path component of the group's directory, as a
    hook name is (:func:`~dist_hooks.store.layout.name_problem`; a hidden ``.name`` is also how
    the store names its temporaries), not ``zarr.json`` (the group's own metadata file) and not
    ``__name`` (Zarr v3 reserves those); and it must not be one of the format's own columns.
    """
    if name in RESERVED_NAMES:
        return f"is the name of the format's own {name!r} column"
    if name_problem(name) is not None or name.startswith("__") or name == "zarr.json":
        return "cannot be a Zarr array name (one path component, not hidden, not '__'-prefixed)"
    return None


def column_name_problem(name: str) -> str | None:
    """Why a custom scalar cannot be a CSV column named ``name``, or None: a format column's
    name, or characters that the header line cannot hold unambiguously."""
    if name in RESERVED_NAMES:
        return f"is the name of the format's own {name!r} column"
    if not name or any(c in name for c in ',"\r\n\0'):
        return "cannot be a CSV column name (empty, or holds a comma, quote, line break or NUL)"
    return None


class _Output(Protocol):
    """What the base flushes and closes in the writer thread: a hook's open sink or group writer."""

    def flush(self) -> None: ...
    def close(self) -> None: ...


class RecordingHook:
    """What the three hooks share: protocol attributes, lazy start, the channel, flush/sync/close.

    A subclass issues its device work in ``__call__``, opens its output in ``_start`` (stored in
    ``_output``: flushed and closed here, in the writer thread) and says what a checkpoint
    records of it in ``_sync_files``.
    """

    name: str
    #: what a checkpoint boundary records this hook's files as in the manifest: ``"csv"`` (a log
    #: file, resumed by byte length) or ``"zarr"`` (a record group, resumed by row counts)
    commit_kind: ClassVar[Literal["csv", "zarr"]]
    #: whether the run merges this hook's records across ranks into ``data.zarr/converged``
    merges_converged: ClassVar[bool] = False

    def __init__(self, *, frequency: int, stage: Any, name: str, rank: int | None):
        if int(frequency) < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        if as_stage(stage) is None:
            raise ValueError(f"unknown stage {stage!r}; expected one of {[s.name for s in Stage]}")
        self.frequency = int(frequency)
        self.stage = stage
        self.name = name
        self._rank_arg = rank
        self.rank: int | None = None
        self._channel: Channel | None = None
        self._streams: Streams | None = None
        self._output: _Output | None = None
        self._closed = False
        self._final: dict = {}  # what close() made durable: what sync() returns after it
        self._warned: set[str] = set()
        self._layout: tuple | None = None  # field names of the last batch seen (BatchView.layout)
        # the committed entry this hook resumes from (see bind); None: a new run
        self._resume_point: dict | None = None

    def committed_path(self, rank: int) -> str | None:
        """Where the file lies that a checkpoint names by path for this hook at ``rank`` (a CSV
        log): an absolute local path or an ``s3://`` URL, as ``RunStorage.url`` writes it (the
        ``path`` its ``sync()`` returns; ``Run`` names it relative to the rank root); None when
        it names none (a record group is named by its group path)."""
        return None

    def bind(self, *, rank: int, resume_point: dict | None) -> None:
        """Place this hook in a run (``Run`` does this when it hands the hook out).

        Call before the first firing: the hook opens its output then, at ``rank`` (instead of the
        ``rank=`` it was built with, or the launcher's), and first cuts it back to ``resume_point``,
        this hook's committed entry in the manifest of the run being resumed. ``{}`` means the hook
        never reached a boundary: cut back to nothing. None means a new run: nothing to cut.
        """
        if self._channel is not None:
            raise RuntimeError(f"{self.name}: bind() after the hook's first firing; bind it before")
        self._rank_arg = int(rank)
        self._resume_point = resume_point

    # -- protocol -------------------------------------------------------------------------------
    def _runs_on_stage(self, stage: Any) -> bool:
        """Stage test by name or value, for engines whose own stage enum is not ours (nvalchemi's
        ``HookStageEnum``); passing the engine's member as ``stage=`` works as well."""
        return stage_matches(self.stage, stage)

    def _should_fire(self, ctx: Any, stage: Any) -> bool:
        if stage is not None and not stage_matches(self.stage, stage):
            return False
        return int(getattr(ctx, "step_count", 0)) % self.frequency == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def on_register(self, engine: Any) -> None:  # nvalchemi calls this; nothing to prepare eagerly
        pass

    # -- lifecycle ------------------------------------------------------------------------------
    def _start(self, view: BatchView) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: hook was closed; create a new one to record again")
        self.rank = resolve_rank(self._rank_arg)
        self._channel = Channel(f"{type(self).__name__}({self.name!r}, rank {self.rank})")
        self._streams = Streams(view.device)
        register_for_exit(self)

    def _view(self, batch: Any) -> BatchView:
        """The view of this firing's batch; a new layout (names found) is checked once, here.
        An empty batch (every system retired) is neither checked nor remembered: its discovery
        cannot place the fields whose level only their leading dimension tells, and the caller
        records nothing for it."""
        view = BatchView.of(batch, self._layout)
        if view.num_systems == 0:
            return view
        if view.layout != self._layout:
            self._check_view(view)
            self._layout = view.layout
        return view

    def _check_view(self, view: BatchView) -> None:
        """Refuse, naming the field, a batch this hook cannot record (at a layout change only)."""

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", self.name, msg)

    def flush(self) -> None:
        """Push everything recorded so far to the writer and wait until it is written.
        Before the first firing and after ``close()`` there is nothing to push: a no-op."""
        if self._channel is None or self._closed:
            return
        self._flush_device()
        self._channel.drain()
        self._channel.submit(self._flush_files)
        self._channel.drain()

    def sync(self) -> dict:
        """Flush, make the files durable (fsync), and return this hook's committed lengths.
        After ``close()`` (an engine closes its hooks before the run's final boundary): what the
        close made durable, without touching the closed files."""
        if self._closed:
            return dict(self._final)
        if self._channel is None:
            return {}
        self.flush()
        out: dict = {}
        self._channel.submit(lambda: out.update(self._sync_files()))
        self._channel.drain()
        return out

    def close(self) -> None:
        """Flush, make the files durable, close them. Idempotent; ``flush``/``sync`` after it are
        no-ops (``sync`` returns the lengths made durable here), in any order."""
        if self._closed:
            return
        try:
            if self._channel is not None:
                self._final = self.sync()
        finally:
            self._closed = True
            if self._channel is not None:
                self._channel.submit(self._close_files)
                self._channel.drain()

    def _flush_files(self) -> None:
        if self._output is not None:
            self._output.flush()

    def _close_files(self) -> None:
        if self._output is not None:
            self._output.close()

    # implemented by subclasses
    def _flush_device(self) -> None:
        """Ship device-side state to the writer (LoggingHook's ring); nothing by default."""

    def _sync_files(self) -> dict:
        """In the writer thread, after a flush: make the output durable, return its commit entry."""
        return {}

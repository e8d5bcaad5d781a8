"""Recording hooks that follow nvalchemi's hook protocol and run from a plain PyTorch loop too.

One module per hook family over a shared base: ``base`` (protocol attributes, lazy start, the writer
channel, flush/sync/close, ``bind``), ``logging`` (``LoggingHook``, its default scalars computed by ``reductions``) writing through the ``LogSink`` of
its backend (``log_sinks``), and ``snapshot`` (``SnapshotHook``, ``ConvergedSnapshotHook``) writing to
a ``RecordSink`` (``store.ZarrSink``).
"""
from __future__ import annotations

from ..errors import SchemaChangedError
from .base import RecordingHook, resolve_rank
from .log_sinks import CsvLogSink, CustomLogSink, LogSink, TensorBoardLogSink
from .logging import DEFAULT_SCALARS, LoggingHook
from .reductions import KB_EV_PER_K
from .snapshot import ConvergedSnapshotHook, RecordSink, RecordWriter, SnapshotHook

#: the earlier name of :class:`~dist_hooks.errors.SchemaChangedError`
FieldChangedError = SchemaChangedError

__all__ = ["DEFAULT_SCALARS", "KB_EV_PER_K", "ConvergedSnapshotHook", "CsvLogSink", "CustomLogSink",
           "FieldChangedError", "LogSink", "LoggingHook", "RecordSink", "RecordWriter", "SnapshotHook",
           "TensorBoardLogSink", "RecordingHook", "resolve_rank"]

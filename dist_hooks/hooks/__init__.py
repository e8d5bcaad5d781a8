"""Recording hooks that follow nvalchemi's hook protocol and run from a plain PyTorch loop too.

One module per hook family over a shared base: ``base`` (protocol attributes, lazy start, the writer
channel, flush/sync/close), ``logging`` (``LoggingHook``), ``snapshot`` (``SnapshotHook``,
``ConvergedSnapshotHook``).
"""
from __future__ import annotations

from ..errors import SchemaChangedError
from .base import _RecordingHook, resolve_rank
from .logging import DEFAULT_SCALARS, KB_EV_PER_K, LoggingHook
from .snapshot import ConvergedSnapshotHook, SnapshotHook

#: the earlier name of :class:`~dist_hooks.errors.SchemaChangedError`
FieldChangedError = SchemaChangedError

__all__ = ["DEFAULT_SCALARS", "KB_EV_PER_K", "ConvergedSnapshotHook", "FieldChangedError", "LoggingHook",
           "SnapshotHook", "_RecordingHook", "resolve_rank"]

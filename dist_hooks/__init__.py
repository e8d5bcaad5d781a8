"""dist_hooks: distributed, stream-async recording hooks for batched atomistic simulation.

Hooks (``LoggingHook``, ``SnapshotHook``, ``ConvergedSnapshotHook``) follow nvalchemi's hook protocol;
``ZarrSink`` is the rank-sharded Zarr v3 store the snapshot hooks write to; ``Run`` adds checkpoint
boundaries, the cross-rank merge of converged samples and resume; ``open_run`` reads a run back.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .stages import Stage
from .hooks import ConvergedSnapshotHook, FieldChangedError, LoggingHook, SnapshotHook
from .engine import RecorderError
from .store import ZarrSink
from .launch import LaunchError, LaunchInfo, detect_launch
from .comm import CommTimeoutError, Communicator, get_communicator
from .coordinator import Preempted, ResumeError, Run
from .reader import open_run

__all__ = [
    "CommTimeoutError", "Communicator", "ConvergedSnapshotHook", "FieldChangedError", "LaunchError",
    "LaunchInfo", "LoggingHook", "Preempted", "RecorderError", "ResumeError", "Run", "SnapshotHook",
    "Stage", "ZarrSink", "detect_launch", "get_communicator", "open_run", "__version__",
]

"""dist_hooks: distributed, stream-async recording hooks for batched atomistic simulation.

Hooks (``LoggingHook``, ``SnapshotHook``, ``ConvergedSnapshotHook``) follow nvalchemi's hook protocol;
``ZarrSink`` is the rank-sharded Zarr v3 store the snapshot hooks write to; ``Run`` adds checkpoint
boundaries, the cross-rank merge of converged samples and resume; ``open_run`` reads a run back.

Names are imported on first use: ``dist-hooks info`` and other readers then start without paying for
torch and the communicators they never touch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Stage": ".stages",
    "LoggingHook": ".hooks", "SnapshotHook": ".hooks", "ConvergedSnapshotHook": ".hooks",
    "FieldChangedError": ".hooks",
    "DistHooksError": ".errors", "DamageError": ".errors", "RecorderError": ".errors",
    "RunError": ".errors", "SchemaChangedError": ".errors",
    "ZarrSink": ".store",
    "LaunchError": ".errors", "LaunchInfo": ".launch", "detect_launch": ".launch",
    "CommTimeoutError": ".errors", "Communicator": ".comm", "get_communicator": ".comm",
    "Preempted": ".preemption", "ResumeError": ".errors", "Run": ".run",
    "open_run": ".reader",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_hooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

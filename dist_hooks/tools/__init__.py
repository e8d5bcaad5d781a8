"""The work behind the ``dist-hooks`` command: consolidate, info, verify, export, plot.

Each submodule is importable on its own and exposes one function the CLI calls. The exit codes
and the errors that map onto them live in :mod:`dist_hooks.errors`, the progress bar in
:mod:`.progress`; both are re-exported here because code outside the package imported them
from ``dist_hooks.tools``.
"""
from __future__ import annotations

from ..errors import (
    EXIT_DAMAGE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_USAGE,
    DamageError,
    LockHeldError,
    MissingDependencyError,
    RunError,
    exit_code_of,
)
from .progress import Progress

__all__ = [
    "EXIT_DAMAGE",
    "EXIT_INTERRUPTED",
    "EXIT_LOCKED",
    "EXIT_MISSING_DEPENDENCY",
    "EXIT_OK",
    "EXIT_USAGE",
    "DamageError",
    "LockHeldError",
    "MissingDependencyError",
    "Progress",
    "RunError",
    "exit_code_of",
]

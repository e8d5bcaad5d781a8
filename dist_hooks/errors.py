"""Every error dist_hooks raises on purpose, under one base class.

Why one hierarchy: a caller (a workflow engine, the ``dist-hooks`` command, a test) should be able
to tell "this package refused or detected something" from a bug, with one ``except``, and then
tell the few kinds apart by what they mean, not by which module raised them. A class that replaced
one derived from a builtin (``RuntimeError``, ``ValueError``, ``TimeoutError``) keeps that base
too, so code that caught those keeps working.

``exit_code`` is the status the ``dist-hooks`` command exits with for that error (docs/cli.md).
"""
from __future__ import annotations

from typing import Sequence

#: Exit statuses of the ``dist-hooks`` command, one place (docs/cli.md lists them).
EXIT_OK = 0
#: damage found (verify), or committed data that do not match their checksums
EXIT_DAMAGE = 1
#: usage error, or a path that is not a run
EXIT_USAGE = 2
#: another process holds a lock of the run (a job recording it, a consolidate of it)
EXIT_LOCKED = 3
#: an optional dependency (an extra) is missing
EXIT_MISSING_DEPENDENCY = 4
#: interrupted (Ctrl-C)
EXIT_INTERRUPTED = 130


class DistHooksError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = EXIT_USAGE


class LaunchError(DistHooksError, RuntimeError):
    """The launch environment is partial or self-contradictory.

    Raised instead of guessing, because a wrong guess (two rank-0 processes, a rank outside the
    world) corrupts the on-disk layout silently. The message names the variables involved.
    """


class CommTimeoutError(DistHooksError, TimeoutError):
    """A collective could not complete because some ranks did not take part in time.

    Attributes:
        missing_ranks: the ranks whose contribution never arrived (sorted); the message names them
            too, e.g. ``"rank 0: timed out after 5.0 s in 'gather' waiting for ranks [1]"``.
        rank: the rank raising the error.
        op: the collective (``"barrier"``, ``"gather"``, ``"broadcast"``, ...).
        timeout: the timeout of the call, in seconds.
    """

    def __init__(self, message: str, missing_ranks: Sequence[int] = (), *, rank: int | None = None,
                 op: str | None = None, timeout: float | None = None):
        super().__init__(message)
        self.missing_ranks: list[int] = sorted(int(r) for r in missing_ranks)
        self.rank = rank
        self.op = op
        self.timeout = timeout

    def __reduce__(self):  # keep the attributes when the error crosses a process boundary
        return (_rebuild_timeout_error,
                (str(self), self.missing_ranks, self.rank, self.op, self.timeout))


def _rebuild_timeout_error(message: str, missing: list[int], rank: int | None, op: str | None,
                           timeout: float | None) -> CommTimeoutError:
    return CommTimeoutError(message, missing, rank=rank, op=op, timeout=timeout)


class RecorderError(DistHooksError, RuntimeError):
    """The background writer failed (full disk, permissions, ...); raised in the simulation
    thread at the next call, ``flush()``, ``sync()`` or boundary. The data committed at the last
    boundary stay intact."""


class SchemaChangedError(DistHooksError, ValueError):
    """What a hook records changed shape after its first firing: a field's dtype, level or
    per-row shape, a field that disappeared, or CSV columns that differ from the file's header."""


class BatchError(DistHooksError, ValueError):
    """A batch (or a custom scalar) that cannot be recorded as it is, refused at the call that
    sees it: a field named like a key column or unusable as a file name, a dtype numpy cannot
    hold, an integer field where a reduction needs floats, a shape the hook cannot place."""


class RunError(DistHooksError):
    """The path is not a run (or a consolidated run), or cannot be used as asked."""


class DamageError(RunError, RuntimeError):
    """Committed data do not match the bytes on disk. ``places`` name each damaged spot."""

    exit_code = EXIT_DAMAGE

    def __init__(self, message: str, places: list[str] | None = None) -> None:
        super().__init__(message)
        self.places = list(places) if places is not None else [message]


class ShardDamage(DamageError):
    """A Zarr shard file is missing, truncated or does not decode; the message names it."""


class ResumeError(RunError, RuntimeError):
    """The run directory cannot be continued as asked: another world size, ``resume="never"``
    on an existing run, ``resume="always"`` on a new one. (Damaged committed data, the manifest
    or a saved state included, raise :class:`DamageError`.)"""


class LockHeldError(RunError):
    """Another process holds a lock of this run: a job recording it (``RUN/.run.lock``, one
    writer per run directory) or a ``dist-hooks consolidate`` of it (``RUN/.consolidate.lock``).

    Raised before anything of the run is touched; the message names the holder (host, pid, job
    id). The kernel releases a lock when its process exits, however it exits (on NFS: once the
    server notices), so a dead job leaves no stale lock: wait for the holder, or stop it."""

    exit_code = EXIT_LOCKED


class CommitConflictError(LockHeldError):
    """Another writer owns the run now: on an object store, ``run.json`` changed since this
    writer last read or wrote it (its compare-and-swap commit was refused), or this writer's
    lease was taken over or could not be renewed in time. Nothing was committed; the other
    writer's boundary stays in force. Raised so that two writers can never both commit."""


class MissingDependencyError(RunError):
    """An optional extra (``dist_hooks[ase]``, ``dist_hooks[plot]``) is needed and missing."""

    exit_code = EXIT_MISSING_DEPENDENCY


def exit_code_of(exc: BaseException) -> int:
    """The process exit status for an error raised by a tool."""
    return int(getattr(exc, "exit_code", EXIT_USAGE))

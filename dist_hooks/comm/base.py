"""The abstract :class:`Communicator`: collectives over small Python objects with deadlines.

Shared by every backend: the default timeout, the pickle protocol for payloads, and the one
wording of the :class:`~dist_hooks.errors.CommTimeoutError` message that names missing ranks
(tests and users match it).
"""
from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from typing import Any, Sequence

from ..errors import CommTimeoutError

DEFAULT_TIMEOUT = 300.0
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def timeout_error(rank: int, op: str, timeout: float, missing: Sequence[int],
                  detail: str = "") -> CommTimeoutError:
    missing = sorted(missing)
    who = f"ranks {missing}" if missing else "other ranks (which ones is unknown)"
    message = f"rank {rank}: timed out after {timeout:.1f} s in {op!r} waiting for {who}"
    if detail:
        message += f" ({detail})"
    return CommTimeoutError(message, missing, rank=rank, op=op, timeout=timeout)


class Communicator(ABC):
    """Collectives over small Python objects with a per-call deadline.

    Every rank calls the same collectives in the same order, with the same ``root``; a rank that
    does not arrive within the timeout makes the others raise :class:`CommTimeoutError` naming it.

    The public methods are written once, here: they refuse a closed communicator, resolve the
    timeout (``None`` means :attr:`timeout`; it must be positive), check ``root`` and answer a
    world of one without any traffic.  Only then do they call the backend's transport
    (``_barrier_impl``, ``_gather_impl``, ``_broadcast_impl``), so a backend never sees a bad
    argument, a closed state or a single rank.  ``_close_impl`` runs once, on the first
    :meth:`close`.

    Attributes:
        rank: this process's rank in the communicator.
        world_size: number of ranks.
        name: implementation (``"single"``, ``"torch"``, ``"mpi"``), for logs and manifests.
        timeout: seconds a call waits when it is given ``timeout=None``.
    """

    name: str = "abstract"

    def __init__(self, rank: int, world_size: int, timeout: float = DEFAULT_TIMEOUT):
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.timeout = float(timeout)
        self._closed = False

    # -- public API ------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier; CommTimeoutError otherwise.

        Called by every rank.
        """
        t = self._timeout(timeout)
        if self.world_size > 1:
            self._barrier_impl(t)

    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        """Collect one object per rank on ``root``: a list by rank there, ``None`` elsewhere.

        Called by every rank.  Non-root ranks return as soon as their object is posted (as with
        MPI); only the root waits, so only the root detects missing ranks.  The root's own entry
        is ``obj`` itself; the others are unpickled copies.
        """
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return [obj]
        return self._gather_impl(obj, root, t)

    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        """Return ``root``'s ``obj`` on every rank (other ranks' ``obj`` is ignored).

        Called by every rank.  The root returns as soon as the object is posted; the other ranks
        wait for it.
        """
        t = self._timeout(timeout)
        self._check_root(root)
        if self.world_size == 1:
            return obj
        return self._broadcast_impl(obj, root, t)

    def close(self) -> None:
        """Release resources; further calls raise.  Idempotent.

        Called by every rank once it is done with the communicator (a backend may need all of
        them: see ``TorchCommunicator``).
        """
        if self._closed:
            return
        self._closed = True
        self._close_impl()

    # -- transport, one per backend ----------------------------------------------------------------
    # Called only with world_size > 1, a valid root and a positive timeout (seconds), while open.
    @abstractmethod
    def _barrier_impl(self, timeout: float) -> None:
        """Block until every rank has arrived, or raise CommTimeoutError naming the missing."""

    @abstractmethod
    def _gather_impl(self, obj: Any, root: int, timeout: float) -> list | None:
        """The list by rank on ``root`` (its own entry ``obj`` itself), ``None`` elsewhere."""

    @abstractmethod
    def _broadcast_impl(self, obj: Any, root: int, timeout: float) -> Any:
        """``obj`` on ``root`` (returned as soon as it is posted), its copy elsewhere."""

    @abstractmethod
    def _close_impl(self) -> None:
        """Release the backend's resources; called once, already marked closed."""

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        """True on rank 0, the conventional coordinator."""
        return self.rank == 0

    def _timeout(self, timeout: float | None) -> float:
        """The call's timeout in seconds; raises once closed or for a non-positive value."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if timeout is None:
            return self.timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return float(timeout)

    def _check_root(self, root: int) -> int:
        if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < self.world_size:
            raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root!r}")
        return root

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, "
                f"timeout={self.timeout})")

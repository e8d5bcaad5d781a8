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
    @abstractmethod
    def barrier(self, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier; CommTimeoutError otherwise."""

    @abstractmethod
    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        """Collect one object per rank on ``root``: a list by rank there, ``None`` elsewhere.

        Non-root ranks return as soon as their object is posted (as with MPI); only the root
        waits, so only the root detects missing ranks.  The root's own entry is ``obj`` itself;
        the others are unpickled copies.
        """

    @abstractmethod
    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        """Every rank gets the list of all ranks' objects, indexed by rank."""

    @abstractmethod
    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        """Return ``root``'s ``obj`` on every rank (other ranks' ``obj`` is ignored).

        The root returns as soon as the object is posted; the other ranks wait for it.
        """

    @abstractmethod
    def close(self) -> None:
        """Release resources; further calls raise.  Idempotent."""

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        """True on rank 0, the conventional coordinator."""
        return self.rank == 0

    def _timeout(self, timeout: float | None) -> float:
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

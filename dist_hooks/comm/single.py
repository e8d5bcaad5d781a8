"""The trivial world of one process."""
from __future__ import annotations

from typing import Any

from .base import DEFAULT_TIMEOUT, Communicator


class SingleCommunicator(Communicator):
    """World of one process: every collective is the identity, nothing can go missing."""

    name = "single"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(0, 1, timeout)

    def barrier(self, timeout: float | None = None) -> None:
        self._timeout(timeout)

    def gather(self, obj: Any, root: int = 0, timeout: float | None = None) -> list | None:
        self._timeout(timeout)
        self._check_root(root)
        return [obj]

    def allgather(self, obj: Any, timeout: float | None = None) -> list:
        self._timeout(timeout)
        return [obj]

    def broadcast(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        self._timeout(timeout)
        self._check_root(root)
        return obj

    def close(self) -> None:
        self._closed = True

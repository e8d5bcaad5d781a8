"""The caller's simulation state, saved by each rank at every boundary and loaded on resume.

Why a module of its own: the state is the one thing a run keeps that is neither recorded data
nor the manifest — an opaque ``torch.save`` of whatever ``Run(state_fn=...)`` returns, replaced
atomically through the rank root's storage, named in the commit record by size and crc32, and
pruned to the two boundaries that can still be in force.
"""
from __future__ import annotations

import io
from typing import Any, Callable

import torch

from .errors import DamageError
from .store import layout
from .store.manifest import StateFile
from .store.storage import RunStorage

#: the state of the boundary in force and of the one being written
KEEP_STATES = 2


class SavedStates:
    """One rank's saved states under its rank root (``state/rank-XXXXX/b-NNNNNN.pt``)."""

    def __init__(self, files: RunStorage, rank: int) -> None:
        self.files, self.rank = files, rank

    def save(self, index: int, step: int | None, state_fn: Callable[[], Any]) -> StateFile:
        """Save ``state_fn()`` as boundary ``index``'s state; its commit entry."""
        buf = io.BytesIO()
        torch.save({"step": step, "state": state_fn()}, buf)
        data = buf.getvalue()
        rel = layout.state_file(self.rank, index)
        self.files.replace(rel, data)
        return StateFile.of(rel, data)

    def prune(self) -> None:
        """Remove all but the newest :data:`KEEP_STATES` states."""
        d = layout.state_dir(self.rank)
        names = [n for n in self.files.list(d) if n.startswith("b-") and n.endswith(".pt")]
        for name in names[:-KEEP_STATES]:
            self.files.remove(f"{d}/{name}")

    def load(self, state: StateFile) -> Any:
        """The state a commit entry names; :class:`DamageError` if the file does not match it."""
        where = self.files.url(state.path, f"{layout.MANIFEST} (state of rank {self.rank})")
        data = self.files.read(state.path)
        if data is None or state.mismatch(data) is not None:
            raise DamageError(f"{where}: saved simulation state does not match its checksum in "
                              "run.json")
        return torch.load(io.BytesIO(data), weights_only=False)["state"]

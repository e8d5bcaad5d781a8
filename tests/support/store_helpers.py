"""Test-only views of the store: what tests assert about, but no production code needs."""
from __future__ import annotations

import os
from pathlib import Path

from dist_hooks.store import AtomicLocalStore, layout, resolve_data_root


def list_shards(root: str | Path) -> dict[int, list[str]]:
    """``rank -> sorted hook names`` of the record groups under ``ranks/`` (filesystem listing:
    cheap, and independent of possibly stale consolidated metadata)."""
    base = resolve_data_root(root) / layout.RANKS_GROUP
    out: dict[int, list[str]] = {}
    try:
        rank_dirs = sorted(os.scandir(base), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for entry in rank_dirs:
        rank = layout.parse_rank_name(entry.name)
        if rank is None or not entry.is_dir():
            continue
        hooks = sorted(h.name for h in os.scandir(entry.path)
                       if h.is_dir() and not h.name.startswith(".")
                       and os.path.exists(os.path.join(h.path, "zarr.json")))
        out[rank] = hooks
    return dict(sorted(out.items()))


def pending_sync(store: AtomicLocalStore) -> int:
    """How many paths were written or removed through ``store`` since its last ``sync()``."""
    with store._dirty_lock:
        return len(store._dirty)

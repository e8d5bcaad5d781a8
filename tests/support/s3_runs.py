"""Test-only: a run recorded on local disk put on an S3 server as an object-store run.

Why: the tools' tests need an object-store run whose every byte is known (a local run they can
compare with), without waiting for a recording to the server. The layout is the object store's
(docs/format.md): every file of the run one object at its relative key, and every CSV log
``logs/<hook>/rank-XXXXX.csv`` a folder of parts, written here through
:meth:`LogParts.append <dist_hooks.store.log_parts.LogParts.append>` as a writer would: the
header with the first rows, then the rest in ``parts`` blocks of whole rows.
"""
from __future__ import annotations

from pathlib import Path

from dist_hooks.store.log_parts import LogParts
from dist_hooks.store.object_storage import ObjectRunStorage

#: local files that are no part of a run on a store (the writer's lock is a lease there)
_SKIP = (".run.lock", ".consolidate.lock")


def row_blocks(data: bytes, parts: int) -> list[bytes]:
    """``data`` (a CSV: header line, then rows) as ``parts`` blocks of whole rows, the first
    with the header (fewer blocks when there are fewer rows)."""
    lines = data.splitlines(keepends=True)
    header, rows = lines[:1], lines[1:]
    n = max(1, min(parts, len(rows)))
    cuts = [round(i * len(rows) / n) for i in range(n + 1)]
    blocks = [b"".join(rows[a:b]) for a, b in zip(cuts, cuts[1:])]
    blocks[0] = b"".join(header) + blocks[0]
    return [b for b in blocks if b]


def upload_run(run: Path, storage: ObjectRunStorage, *, parts: int = 3,
               skip: tuple[str, ...] = ("consolidated",)) -> dict[str, list[int]]:
    """Put the run directory ``run`` on ``storage``; returns ``{log: [part offsets]}``.
    Top-level entries named in ``skip`` (a consolidated output) are left out."""
    offsets: dict[str, list[int]] = {}
    for f in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = f.relative_to(run).as_posix()
        if f.name in _SKIP or rel.split("/", 1)[0] in skip:
            continue
        if rel.startswith("logs/") and rel.endswith(".csv"):
            log = LogParts(storage, rel)
            offsets[rel] = []
            for block in row_blocks(f.read_bytes(), parts):
                offsets[rel].append(log.size)
                log.append(block)
        else:
            storage.replace(rel, f.read_bytes())
    return offsets

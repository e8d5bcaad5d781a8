"""Digests of a run directory's files, for comparing runs made by different versions of the code.

Independent of dist_hooks on purpose (hashlib and json only): the reference digests of the
committed v1 fixture (``tests/data/``) were computed with this module beside the code of that
time, and the test computes them again beside today's code.

A ``zarr.json`` file's digest is that of its JSON document without what later versions add
for other tools and a reader can ignore: each array's ``dimension_names`` and its ``units``
attribute (docs/format.md, "Dimension names and units"), also inside the consolidated metadata
of a root. The rest is written again as zarr and this package write it (``indent=2``), which is
the file's own bytes when nothing was removed; so equal digests still mean equal data, codecs,
shapes and attributes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: What differs between two equal runs: wall-clock times, the manifest that holds them, the
#: pickled simulation states, the lock files (they name their holder).
_SKIP_DIRS = ("state", "boundaries")
_SKIP_FILES = ("run.json", ".consolidate.lock", ".run.lock")


def _marker(data: bytes) -> str:
    """consolidated.json without the parts that name the run's manifest (it holds times)."""
    doc = json.loads(data)
    doc.pop("manifest", None)
    doc.get("source", {}).pop("manifest_crc32", None)
    doc.get("options", {}).pop("rank_roots", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _without_names(node: object) -> object:
    """The document with ``dimension_names`` and the ``units`` attribute of every array (at
    any depth: consolidated metadata nests them) left out."""
    if isinstance(node, dict):
        out = {k: _without_names(v) for k, v in node.items()}
        if out.get("node_type") == "array":
            out.pop("dimension_names", None)
            if isinstance(out.get("attributes"), dict):
                out["attributes"].pop("units", None)
        return out
    if isinstance(node, list):
        return [_without_names(v) for v in node]
    return node


def _zarr_json(data: bytes) -> str:
    doc = _without_names(json.loads(data))
    return hashlib.sha256(json.dumps(doc, indent=2).encode()).hexdigest()


def tree_digest(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` that two equal runs share."""
    root = Path(root)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if rel.parts[0] in _SKIP_DIRS or rel.name in _SKIP_FILES:
            continue
        data = f.read_bytes()
        out[str(rel)] = (_marker(data) if rel.name == "consolidated.json" else
                         _zarr_json(data) if rel.name == "zarr.json" else
                         hashlib.sha256(data).hexdigest())
    return out

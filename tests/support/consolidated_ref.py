"""Independent references for what a run and its consolidated output hold, shared by the tests.

Built with plain zarr, numpy and Python's sort only (no dist_hooks code), record by record, so
that they do not share a bug with the consolidate they check.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import zarr

ATOM_FIELDS = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses")


def manifest(run: Path) -> dict:
    return json.loads((Path(run) / "run.json").read_text())


def in_merged_order(rows: list[dict], *, dedup: bool) -> list[dict]:
    """Records (one dict each) in (step, rank, sample_id) order; with ``dedup``, only the first
    of each (rank, sample_id): what a merged converged group holds."""
    rows = sorted(rows, key=lambda r: (int(r["step"]), int(r["rank"]), int(r["sample_id"])))
    if not dedup:
        return rows
    seen, keep = set(), []
    for r in rows:
        key = (int(r["rank"]), int(r["sample_id"]))
        if key not in seen:
            seen.add(key)
            keep.append(r)
    return keep


def reference(run: Path, hook: str, *, dedup: bool = False,
              roots: dict[int, Path] | None = None) -> dict[str, np.ndarray]:
    """All ranks' committed records of ``hook``, record by record with plain zarr, sorted by
    (step, rank, sample_id) with Python's sort, optionally one per (rank, sample_id).
    ``roots``: where each rank's files are (node-local storage), else the run directory."""
    rows = []
    for rk in manifest(run)["last"]["ranks"]:
        info = rk["hooks"].get(hook)
        if not info or not info["records"]:
            continue
        n = info["records"]
        root = (roots or {}).get(rk["rank"], run)
        g = zarr.open_group(str(root / "data.zarr" / info["group"]), mode="r",
                            use_consolidated=False)
        levels = dict(g.attrs["level"])
        ptr = np.asarray(g["atoms_ptr"][: n + 1])
        cols = {k: np.asarray(g[k][: n if lvl == "record" else ptr[n]]) for k, lvl in levels.items()}
        for i in range(n):
            rec = {k: (v[i] if levels[k] == "record" else v[ptr[i]:ptr[i + 1]])
                   for k, v in cols.items()}
            rec["rank"] = np.int64(rk["rank"])
            rows.append(rec)
    rows = in_merged_order(rows, dedup=dedup)
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        if k in ATOM_FIELDS:
            out[k] = np.concatenate([r[k] for r in rows])
        else:
            out[k] = np.stack([np.asarray(r[k]) for r in rows])
    counts = [len(r["positions"]) for r in rows]
    out["atoms_ptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return out


def group(path: Path) -> dict[str, np.ndarray]:
    """Every array of a group, whole, read with plain zarr (a CSR group such as converged/)."""
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {k: np.asarray(a[:]) for k, a in g.arrays()}


def trajectory(path: Path) -> dict[str, np.ndarray]:
    """A consolidated trajectory group (indexed layout) read with plain zarr and turned into the
    CSR form of :func:`reference`: atom rows gathered record by record through atoms_start and
    n_atoms. Also checks the layout: each rank's atoms lie inside its own segment."""
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert g.attrs["atoms_layout"] == "indexed" and "atoms_ptr" not in dict(g.arrays())
    levels = dict(g.attrs["level"])
    start, count = np.asarray(g["atoms_start"][:]), np.asarray(g["n_atoms"][:])
    rank = np.asarray(g["rank"][:])
    for seg in g.attrs["segments"]:
        mine = rank == seg["rank"]
        assert count[mine].sum() == seg["atoms"]
        assert np.all(start[mine] >= seg["start"])
        assert np.all(start[mine] + count[mine] <= seg["start"] + seg["atoms"])
    out = {}
    for k, lvl in levels.items():
        a = np.asarray(g[k][:])
        out[k] = a if lvl == "record" else (
            np.concatenate([a[s:s + n] for s, n in zip(start.tolist(), count.tolist())])
            if len(start) else a[:0])
    out["atoms_ptr"] = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    return out


def assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for k in want:
        x, y = np.ascontiguousarray(got[k]), np.ascontiguousarray(want[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (what, k, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), (what, k)


def assert_merged_checksums(root) -> None:
    """run.json's crc32 of every field of data.zarr/converged matches the bytes zarr reads."""
    m = json.loads((root / "run.json").read_text())["last"]["merged"]
    g = zarr.open_group(str(root / "data.zarr"), path="converged", mode="r", use_consolidated=False)
    ptr = g["atoms_ptr"][:]
    levels = dict(g.attrs["level"])
    want = {}
    for name, level in levels.items():
        rows = m["records"] if level == "record" else int(ptr[m["records"]])
        want[name] = zlib.crc32(np.ascontiguousarray(g[name][:rows]).tobytes())
    assert m["crc32"] == want and len(want) > 5

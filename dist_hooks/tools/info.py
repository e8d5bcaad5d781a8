"""``dist-hooks info``: what a run holds, from its manifest, in well under a second.

Why from the manifest: it records every rank's committed lengths at the last boundary, so the
counts need no data read (a run of terabytes answers as fast as a small one); only the recorded
step range reads two values per file (the first and last committed step), and disk use walks the
directory. The JSON form (``--json``) has stable keys, documented in ``docs/cli.md``; new keys
may be added, existing ones keep their meaning (``info_version`` says which set).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import zarr

from ..errors import DamageError
from ..store.layout import LOGS_DIR
from ..reader import (
    CONSOLIDATED_MARKER,
    Unit,
    committed_units,
    default_consolidated_dir,
    find_rank_roots,
    manifest_snapshot,
    open_run,
    read_consolidated_summary,
)
from ..store import layout
from ..store.manifest import Manifest
from .mirror import is_url, mirror_run, mirrored_url, naming_url

__all__ = ["INFO_VERSION", "format_info", "run_info"]

INFO_VERSION = 1


def _disk_use(run_dir: Path) -> dict[str, Any]:
    """Apparent bytes per top-level entry of the run directory (and the total)."""
    parts: dict[str, int] = {}
    for entry in os.scandir(run_dir):
        if entry.is_file(follow_symlinks=False):
            size = entry.stat(follow_symlinks=False).st_size
        elif entry.is_dir(follow_symlinks=False):
            size = 0
            for base, _, files in os.walk(entry.path):
                for f in files:
                    try:
                        size += os.lstat(os.path.join(base, f)).st_size
                    except FileNotFoundError:  # a live run replaces files atomically
                        pass
        else:
            continue
        parts[entry.name] = size
    return {"total": sum(parts.values()), "parts": dict(sorted(parts.items()))}


def _zarr_steps(run_dir: Path, u: Unit) -> tuple[int, int] | None:
    n = u.records
    if n <= 0:
        return None
    try:
        arr = zarr.open_array(u.path(run_dir) / "step", mode="r")
        return int(arr[0]), int(arr[n - 1])
    except Exception:  # noqa: BLE001 - info reports what it can; verify names damage
        return None


def _csv_steps(run_dir: Path, u: Unit) -> tuple[int, int] | None:
    nbytes = u.commit.bytes
    if u.commit.rows <= 0:
        return None
    try:
        with open(u.path(run_dir), "rb") as fh:
            head = fh.read(min(nbytes, 1 << 16)).split(b"\n")
            fh.seek(max(nbytes - (1 << 16), 0))
            tail = fh.read(min(nbytes, 1 << 16)).rstrip(b"\n").split(b"\n")
        cols = [c.strip('"') for c in head[0].decode().split(",")]
        i = cols.index("step")
        return int(head[1].split(b",")[i]), int(tail[-1].split(b",")[i])
    except Exception:  # noqa: BLE001
        return None


def run_info(run_dir: str | os.PathLike, *, disk: bool = True,
             rank_roots: Sequence[str | os.PathLike] = (),
             cache: str | os.PathLike | None = None,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a run as a dict with stable keys (see ``docs/cli.md``). ``rank_roots``:
    for a run recorded with ``storage="local"``, the nodes' directories (for the step range).
    An ``s3://`` run (or consolidated output) is mirrored first (``cache``, ``storage_options``:
    as for :func:`~dist_hooks.reader.open_run`); ``run`` and ``consolidated.path`` are then
    URLs and ``disk_bytes`` the bytes of its objects on the store."""
    if is_url(run_dir):
        m = mirror_run(str(run_dir), cache, storage_options)
        with naming_url(m):
            info = run_info(m.path, disk=False, rank_roots=rank_roots)
        info["run"] = mirrored_url(info["run"]) or info["run"]
        if info.get("consolidated"):
            c = info["consolidated"]
            c["path"] = mirrored_url(c["path"]) or c["path"]
        info["disk_bytes"] = m.store_bytes() if disk else None
        return info
    run_dir = Path(run_dir)
    if not (run_dir / layout.MANIFEST).is_file() and (run_dir / CONSOLIDATED_MARKER).is_file():
        return _consolidated_info(run_dir, disk=disk, rank_roots=rank_roots)
    m, crc = manifest_snapshot(run_dir)
    return _manifest_info(run_dir, m, crc, find_rank_roots(run_dir, m, rank_roots), disk)


def _manifest_info(run_dir: Path, m: Manifest, crc: int, roots: dict[int, Path],
                   disk: bool) -> dict[str, Any]:
    """:func:`run_info` of the manifest ``m`` (crc32 ``crc``) of ``run_dir``."""
    units = committed_units(m)
    ranks = []
    for r in sorted(m.ranks, key=lambda r: r.rank):
        hooks = {}
        for u in (u for u in units if u.rank == r.rank):
            if u.kind == "csv":
                hooks[u.hook] = {"kind": "csv", "rows": u.records, "bytes": u.commit.bytes}
            else:
                hooks[u.hook] = {"kind": "zarr", "records": u.records, "atoms": u.atoms,
                                 "converged": u.converged}
        ranks.append({"rank": r.rank, "step": r.step, "final": r.final, "signal": r.signal,
                      "hooks": hooks})
    totals: dict[str, dict] = {}
    for u in units:
        t = totals.setdefault(u.hook, {"kind": u.kind})
        if u.kind == "csv":
            t["rows"] = t.get("rows", 0) + u.records
        else:
            t["records"] = t.get("records", 0) + u.records
            t["atoms"] = t.get("atoms", 0) + u.atoms
    lo = hi = None
    for u in units:
        if u.rank in roots:  # node-local files not given: no step range from them
            root = roots[u.rank]
            s = _csv_steps(root, u) if u.kind == "csv" else _zarr_steps(root, u)
            if s is not None:
                lo = s[0] if lo is None else min(lo, s[0])
                hi = s[1] if hi is None else max(hi, s[1])
    out_dir = default_consolidated_dir(run_dir)
    try:
        summary = read_consolidated_summary(out_dir)
    except DamageError:  # damaged: not usable, so not up to date (verify is for damage)
        summary = {}
    consolidated = None
    if summary is not None:
        consolidated = {"path": str(out_dir), "up_to_date":
                        summary.get("source", {}).get("manifest_crc32") == crc}
    hooks = {name: {**h.to_json(), "kind": totals.get(name, {}).get("kind")}
             for name, h in m.hooks.items()}
    for name, h in hooks.items():  # a TensorBoard log commits nothing: say where its events are
        if h.get("backend") == "tensorboard" and (run_dir / LOGS_DIR / name).is_dir():
            h["log_dir"] = f"{LOGS_DIR}/{name}"
    return {
        "info_version": INFO_VERSION,
        "run": str(run_dir.resolve()),
        "format": m.format,
        "format_version": m.format_version,
        "dist_hooks_version": m.dist_hooks_version,
        "created": m.created,
        "world_size": m.world_size,
        "launcher": m.launcher,
        "job_id": m.job_id,
        "storage": m.storage,
        "checkpoint_every": m.checkpoint_every,
        "hooks": hooks,
        "boundaries": [{"index": b.index, "time": b.time, "steps": b.steps,
                        "converged_count": b.converged_count, "all_final": b.all_final}
                       for b in m.boundaries],
        "last_boundary": m.last.index if m.last is not None else None,
        "complete": bool(m.last is not None and m.last.all_final),
        "ranks": ranks,
        "totals": totals,
        "converged_count": m.merged.records,
        "converged_atoms": m.merged.atoms,
        "step_range": None if lo is None else [lo, hi],
        "disk_bytes": _disk_use(run_dir) if disk else None,
        "consolidated": consolidated,
    }


def _consolidated_info(out: Path, *, disk: bool,
                       rank_roots: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """:func:`run_info` of a consolidated output (what ``plot`` and ``export`` accept): the run
    it was made of (from its copy of the manifest, as :func:`~dist_hooks.reader.open_run` reads
    it; its source directory, when still beside it and unchanged, for the step range), the
    output's own disk use, and ``consolidated`` naming it."""
    run = open_run(out, rank_roots)
    crc = int((run.summary or {}).get("source", {}).get("manifest_crc32") or 0)
    info = _manifest_info(run.path or out, run.manifest, crc, run.roots, disk=False)
    info["run"] = None if run.path is None else str(run.path.resolve())
    info["disk_bytes"] = _disk_use(out) if disk else None
    src = out / str((run.summary or {}).get("source", {}).get("relative", ".."))
    fresh = True if run.path is not None else (False if (src / layout.MANIFEST).is_file() else None)
    info["consolidated"] = {"path": str(out.resolve()), "up_to_date": fresh}
    return info


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_FRESH = {True: "up to date", False: "stale", None: "its run directory is not beside it"}


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`run_info`."""
    bs = info["boundaries"]
    lines = [f"run          {info['run'] or '- (a consolidated output away from its run)'}",
             f"format       {info['format']} v{info['format_version']} (written by dist_hooks "
             f"{info.get('dist_hooks_version')})",
             f"launcher     {info['launcher']}, world size {info['world_size']}, job id "
             f"{info['job_id'] or '-'}, storage {info['storage']}"]
    if bs:
        b = bs[-1]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["time"])) if b.get("time") \
            else "?"
        lines.append(f"boundaries   {len(bs)} (every {info['checkpoint_every'] or '-'} steps); "
                     f"last #{b['index']} at step {b['steps'][1]} on {when}, "
                     f"{'final' if info['complete'] else 'not final (run unfinished or crashed)'}")
    else:
        lines.append("boundaries   none committed yet")
    sr = info["step_range"]
    lines.append(f"steps        {'recorded ' + str(sr[0]) + ' .. ' + str(sr[1]) if sr else '-'}")
    lines.append(f"converged    {info['converged_count']} records ({info['converged_atoms']} "
                 f"atoms), merged over all ranks")
    if info.get("disk_bytes"):
        d = info["disk_bytes"]
        parts = ", ".join(f"{k} {_size(v)}" for k, v in d["parts"].items() if v)
        lines.append(f"disk         {_size(d['total'])} ({parts})")
    c = info.get("consolidated")
    lines.append("consolidated " + ("no" if c is None else
                                    f"{c['path']} ({_FRESH[c['up_to_date']]})"))
    lines.append("")
    lines.append(f"{'hook':<14} {'type':<22} {'rank':>5} {'records/rows':>13} {'atoms':>10}")
    for name in sorted(info["totals"]):
        typ = (info["hooks"].get(name) or {}).get("type", "?")
        for r in info["ranks"]:
            h = r["hooks"].get(name)
            if h is None:
                continue
            n = h["rows"] if h["kind"] == "csv" else h["records"]
            at = "" if h["kind"] == "csv" else str(h["atoms"])
            lines.append(f"{name:<14} {typ:<22} {r['rank']:>5} {n:>13} {at:>10}")
        t = info["totals"][name]
        n = t.get("rows", t.get("records", 0))
        lines.append(f"{name:<14} {'':<22} {'all':>5} {n:>13} "
                     f"{'' if t['kind'] == 'csv' else t.get('atoms', 0):>10}")
    for name in sorted(set(info["hooks"]) - set(info["totals"])):  # hooks that commit nothing
        h = info["hooks"][name]
        what = {"tensorboard": "TensorBoard events, not committed" +
                (f" ({h['log_dir']}/rank-*)" if h.get("log_dir") else ""),
                "custom": "rows to a custom writer_fn, not in the run"}.get(
                    h.get("backend"), "nothing committed yet")
        lines.append(f"{name:<14} {h.get('type', '?'):<22} {'-':>5} {'-':>13} {'':>10}  {what}")
    return "\n".join(lines)

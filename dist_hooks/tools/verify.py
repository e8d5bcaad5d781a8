"""``dist-hooks verify``: every committed length and checksum against the bytes on disk.

Why a separate check: the writers guarantee that a *crash* never damages committed data, but
disks, copies (rsync of a live run, a truncated transfer) and people do. Before trusting a run
(or consolidating it) this reads every committed byte once and names the exact file and place of
anything that does not match what the last checkpoint boundary recorded:

* ``run.json`` parses, is this format, every name and path in it is one a writer writes
  (the parser's rules) and stays inside the run directory, the boundary files exist, and the
  last one equals the manifest's ``last`` entry; every rank of the world committed; the
  ``data.zarr`` root is a Zarr group (:func:`~dist_hooks.reader.run_problems`, the run-wide
  checks every merging tool makes too);
* CSV logs: long enough, crc32 of the committed prefix, data row count, header;
* Zarr groups: group and arrays present, shapes cover the committed lengths, ``atoms_ptr`` is
  int64, starts at 0, never decreases and ends at the committed atom count, dtypes and per-row
  shapes agree across ranks, steps never go back, crc32 of every field over its committed rows;
* the saved simulation states: size and crc32;
* the merged ``converged`` group: its committed records equal the ranks' committed converged
  records, ordered and de-duplicated as the coordinator does.

Data past the committed lengths (left by a crash) are ignored: they are not promised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..reader import (
    DamageError,
    Unit,
    committed_units,
    find_rank_roots,
    load_manifest,
    run_path,
    run_problems,
)
from ..records import merge_blocks
from ..store.manifest import CommitRecord, Manifest
from ..store import layout
from ..store.array_layout import ArrayLayout
from ..store.csv_log import read_header, scan_prefix
from .mirror import Mirror, is_url, mirror_run, naming_url
from .progress import Progress
from .record_source import BlockCrc, ZarrSource

__all__ = ["format_report", "quick_unit_problems", "verify_run"]


def quick_unit_problems(run_dir: Path | None, u: Unit) -> list[str]:
    """Checks of one unit that read no data: path inside the run (symlinks resolved; the
    manifest's parser has checked the names), file or group present and long enough. ``run_dir``: the unit's rank root, ``None``
    when none of the given ``--rank-root`` directories holds it (node-local storage)."""
    if run_dir is None:
        return [f"{u.rel}: in none of the --rank-root directories (storage=local)"]
    try:
        path = u.path(run_dir)
    except DamageError as exc:
        return [str(exc)]
    if u.kind == "csv":
        want = u.commit.bytes
        if not path.is_file():
            return [f"{u.rel}: file missing (committed {want} bytes)"]
        size = path.stat().st_size
        if size < want:
            return [f"{u.rel}: file is {size} bytes, committed {want}"]
        return []
    if not (path / "zarr.json").is_file():
        return [f"{u.rel}: group missing (committed {u.records} records)"]
    return []


def _group_bytes(group_dir: Path, records: int, atoms: int) -> int:
    """Uncompressed bytes of a group's committed rows, from its ``zarr.json`` documents alone:
    what its :class:`ZarrSource` will read and report, so the progress bar's total is known
    before any data are. 0 for what cannot be parsed (the checks themselves name that)."""
    try:
        meta = json.loads((group_dir / "zarr.json").read_bytes())
        total = 0
        for name, level in (meta.get("attributes", {}).get("level") or {}).items():
            lay, _ = ArrayLayout.of(group_dir / name)
            rows = records if level == "record" else atoms
            total += rows * int(np.prod(lay.trailing, dtype=np.int64)) * lay.dtype.itemsize
        return total
    except (OSError, ValueError, TypeError, AttributeError, KeyError, DamageError):
        return 0


def _read_bytes(roots: dict[int, Path], units: list[Unit]) -> int:
    """Every byte :func:`verify_run` will read of ``units`` (CSV prefixes and groups)."""
    total = 0
    for u in units:
        if u.kind == "csv":
            total += u.commit.bytes
        elif u.rank in roots:
            try:
                total += _group_bytes(u.path(roots[u.rank]), u.records, u.atoms)
            except DamageError:
                pass
    return total


def _problem(message: str, u: Unit | None = None) -> dict[str, Any]:
    return {"message": message, "rank": None if u is None else u.rank,
            "hook": None if u is None else u.hook}


def _check_csv(run_dir: Path, u: Unit, bar: Progress) -> list[str]:
    path = u.path(run_dir)
    want, rows = u.commit.bytes, u.commit.rows
    got = scan_prefix(path, want, progress=bar.update)
    out = []
    if got.crc32 != u.commit.crc32:
        out.append(f"{u.rel}: crc32 mismatch over bytes [0, {want})")
        return out
    if want and got.last_byte != b"\n":
        out.append(f"{u.rel}: committed bytes [0, {want}) do not end with a complete row")
    if want and got.newlines - 1 != rows:
        out.append(f"{u.rel}: {got.rows} data rows in the committed bytes, "
                   f"committed {rows}")
    if want:
        cols = read_header(path)
        missing = [c for c in ("step", "sample_id") if c not in cols]
        if missing:
            out.append(f"{u.rel}: header {cols} lacks {missing}")
    return out


def _check_zarr(run_dir: Path, u: Unit, bar: Progress, schemas: dict[str, tuple[int, dict]],
                block_records: int, block_atoms: int) -> list[str]:
    u.path(run_dir)
    src = ZarrSource(run_dir / layout.DATA_DIR, u.group, place=u.rel, records=u.records,
                     atoms=u.atoms, expect_crc=u.commit.crc32,
                     block_records=block_records, block_atoms=block_atoms, progress=bar)
    out = []
    fields = {n: (lvl, str(dt), tuple(tr)) for n, (lvl, dt, tr) in src.fields.items()}
    if u.hook in schemas and u.records:
        ref_rank, ref = schemas[u.hook]
        for n, f in fields.items():
            if n in ref and ref[n] != f:
                out.append(f"{u.rel}/{n}: {f[0]}-level {f[1]} per-row shape {f[2]}, rank "
                           f"{ref_rank} has {ref[n][0]}-level {ref[n][1]} per-row shape "
                           f"{ref[n][2]}")
    elif u.records:
        schemas[u.hook] = (u.rank, fields)
    for _ in src:
        pass
    out.extend(src.problems())
    return out


def _check_state(run_dir: Path, rank: CommitRecord) -> list[str]:
    st = rank.state
    if st is None:
        return []
    try:
        path = run_path(run_dir, st.path, f"{layout.MANIFEST} (state of rank {rank.rank})")
    except DamageError as exc:
        return [str(exc)]
    rel = st.path
    if not path.is_file():
        return [f"{rel}: file missing (committed {st.bytes} bytes)"]
    wrong = st.mismatch(path.read_bytes())
    return [f"{rel}: {wrong}"] if wrong else []


def _check_merged(run_dir: Path, m: Manifest, conv_units: list[Unit], bar: Progress,
                  block_records: int, block_atoms: int,
                  roots: dict[int, Path] | None = None) -> list[str]:
    """The coordinator's merged group against its committed checksums (runs recorded before
    those existed have none) and against the ranks' committed converged records, merged as the
    coordinator merges them (:func:`~dist_hooks.records.merge_blocks`, de-duplicated): the
    second shows that it holds exactly their union, which its own checksums cannot."""
    n, a = m.merged.records, m.merged.atoms
    place = f"{layout.DATA_DIR}/{layout.CONVERGED_GROUP}"
    if n == 0 and not conv_units:
        return []
    src = ZarrSource(run_dir / layout.DATA_DIR, layout.CONVERGED_GROUP, place=place,
                     records=n, atoms=a, expect_crc=m.merged.crc32, block_records=block_records,
                     block_atoms=block_atoms, progress=bar)
    got = BlockCrc.of(src)
    out = src.problems()
    roots = roots or {}
    if not conv_units or any(u.rank not in roots for u in conv_units):
        return out  # the ranks' converged groups are not all here (node-local storage)
    sources = [(u.rank, ZarrSource(roots[u.rank] / layout.DATA_DIR, u.group, place=u.rel,
                                   records=u.records, atoms=u.atoms, block_records=block_records,
                                   block_atoms=block_atoms)) for u in conv_units]
    want = BlockCrc.of(merge_blocks(sources, dedup=True))
    if want.records != n:
        out.append(f"{place}: {layout.MANIFEST} commits {n} merged records, the ranks' committed "
                   f"converged records give {want.records}")
        return out
    for name, crc in want.crc.items():
        if name not in got.crc:
            out.append(f"{place}/{name}: array missing")
        elif got.crc[name] != crc:
            what, rows = (("records", n) if want.levels[name] == "record" else ("atom rows", a))
            out.append(f"{place}/{name}: differs from the ranks' committed converged records "
                       f"over {what} [0, {rows})")
    return out


def verify_run(run_dir: str | os.PathLike, *, manifest: Manifest | None = None,
               check_merged: bool = True, progress: bool | None = False,
               block_records: int = 4096, block_atoms: int = 65536,
               rank_roots: Sequence[str | os.PathLike] = (),
               cache: str | os.PathLike | None = None,
               storage_options: dict[str, Any] | None = None) -> dict:
    """Check a run; returns ``{"ok", "problems": [{message, rank, hook}], "checked": {...}}``.

    ``rank``/``hook`` name the unit a problem belongs to (``None`` for run-wide ones), which is
    what ``consolidate --skip-damaged`` leaves out. Raises :class:`RunError` only when the path
    is not a run at all. ``rank_roots``: for a run recorded with ``storage="local"``, the
    directories holding the nodes' files (without them only the run directory is checked).
    An ``s3://`` run is mirrored first (``cache``, ``storage_options``: as for
    :func:`~dist_hooks.reader.open_run`) and its mirror checked: an object missing or damaged
    on the store is missing or damaged there; what a log's parts lack (a gap, a part whose
    header differs) is added to that log's problems.
    """
    if is_url(run_dir):
        m = mirror_run(str(run_dir), cache, storage_options, progress=progress)
        with naming_url(m):
            report = verify_run(m.path, manifest=manifest, check_merged=check_merged,
                                progress=progress, block_records=block_records,
                                block_atoms=block_atoms, rank_roots=rank_roots)
        return _with_mirror_notes(report, m)
    run_dir = Path(run_dir)
    problems: list[dict] = []
    if manifest is None:
        try:
            manifest = load_manifest(run_dir)
        except DamageError as exc:
            return {"ok": False, "problems": [_problem(str(exc))], "checked": {}}
    for msg in run_problems(run_dir, manifest):
        problems.append(_problem(msg))
    local = manifest.storage == "local"
    roots = find_rank_roots(run_dir, manifest, rank_roots)
    for r in manifest.ranks:
        if r.rank in roots:  # node-local state not given: nothing to read here
            for msg in _check_state(roots[r.rank], r):
                problems.append(_problem(msg))
    units = committed_units(manifest)
    notes = []
    if manifest.last is None:
        notes.append("no checkpoint boundary committed yet: nothing is promised")
    for name, h in sorted(manifest.hooks.items()):  # logs that commit nothing: say so
        where = {"tensorboard": "TensorBoard events", "custom": "a custom writer_fn"}.get(h.backend or "")
        if where is not None:
            notes.append(f"hook {name!r} logs to {where}: no committed length or checksum, "
                         "nothing to check")
    if local and not rank_roots:
        notes.append("storage=local: rank data stay on the nodes; only the merged group and "
                     "the manifest are checked here (give the nodes' directories with "
                     "--rank-root to check them too)")
    checking = units if not (local and not rank_roots) else []
    merged_bytes = _group_bytes(run_dir / layout.DATA_DIR / layout.CONVERGED_GROUP,
                                manifest.merged.records, manifest.merged.atoms) if check_merged else 0
    bar = Progress(_read_bytes(roots, checking) + merged_bytes, "verify", enabled=progress)
    schemas: dict[str, tuple[int, dict]] = {}
    damaged: set[tuple[int, str]] = set()
    checked = 0
    for u in checking:
        root = roots.get(u.rank)
        msgs = quick_unit_problems(root, u)
        if not msgs:
            try:
                msgs = (_check_csv(root, u, bar) if u.kind == "csv" else
                        _check_zarr(root, u, bar, schemas, block_records, block_atoms))
            except DamageError as exc:
                msgs = list(exc.places)
        checked += 1
        for msg in msgs:
            problems.append(_problem(msg, u))
            damaged.add((u.rank, u.hook))
    conv = [u for u in units if u.kind == "zarr" and u.converged]
    if check_merged:
        if any((u.rank, u.hook) in damaged for u in conv):
            notes.append("merged converged group not compared with the ranks' (their converged "
                         "data are damaged)")
            conv = []
        try:
            for msg in _check_merged(run_dir, manifest, conv, bar, block_records, block_atoms,
                                     roots):
                problems.append(_problem(msg))
        except DamageError as exc:
            problems.extend(_problem(p) for p in exc.places)
    bar.close()
    return {"ok": not problems, "problems": problems, "notes": notes,
            "checked": {"units": checked, "boundaries": len(manifest.boundaries),
                        "world_size": manifest.world_size}}


def _with_mirror_notes(report: dict, m: Mirror) -> dict:
    """``report`` of a mirror naming the store: paths as URLs, and each log with problems also
    told what its parts on the store lack (a gap or a foreign header: why it is short)."""
    problems = [{**p, "message": m.fix(p["message"])} for p in report["problems"]]
    for rel, note in sorted(m.notes.items()):
        hit = next((p for p in problems if p["message"].startswith(f"{rel}:")), None)
        if hit is not None:
            problems.append({**hit, "message": note})
    return {**report, "ok": not problems, "problems": problems,
            "notes": [m.fix(n) for n in report.get("notes", [])]}


def format_report(run_dir: str | os.PathLike, report: dict) -> str:
    """Human-readable verify output: one line per problem (``PLACE: what``), then a verdict."""
    lines = [p["message"] for p in report["problems"]]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    c = report.get("checked", {})
    if report["ok"]:
        lines.append(f"OK: {run_dir}: {c.get('boundaries', 0)} boundaries, world size "
                     f"{c.get('world_size')}, {c.get('units', 0)} committed files/groups match "
                     f"their lengths and checksums")
    else:
        n = len(report["problems"])
        lines.append(f"DAMAGED: {run_dir}: {n} problem{'s' if n != 1 else ''} found")
    return "\n".join(lines)

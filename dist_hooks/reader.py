"""Read a recorded run back: ``open_run(path)``, committed data only, consolidated or not.

Why a reader on top of :class:`~dist_hooks.store.GroupReader`: a run directory holds more than
what is trustworthy. After a crash the per-rank CSVs and Zarr groups may hold rows past the last
checkpoint boundary; only the lengths that the manifest (``run.json``) committed are promised
across ranks. Every accessor here is limited to those lengths, and reads the same whether
``dist-hooks consolidate`` has run (then the merged CSV/Parquet and groups are used) or not
(then the per-rank files are read and merged on the fly).

It also holds what the ``dist-hooks`` tools share about a run as committed: loading its
manifest, listing the committed (rank, hook) units, and finding each rank's files.

    run = open_run("runs/x")              # or "runs/x/consolidated"
    run.manifest.world_size, run.ranks
    cols = run.logs("log")                # dict of numpy arrays, ordered by (step, rank, sample_id)
    snap = run.group(1, "snapshots")      # GroupReader limited to rank 1's committed records
    conv = run.converged()                # GroupReader of the merged converged records
    frames = run.frames(3, rank=1)        # one system's snapshots as ase.Atoms (needs ASE)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .ase_frames import Selection, group_frames
from .errors import DamageError, RunError
from .store import layout
from .store.csv_log import (KEY_COLUMNS, iter_csv_batches, narrow_table, read_csv_committed,
                            sort_table)
from .store.group_reader import GroupReader
from .store.manifest import (BoundaryEntry, BoundarySummary, CsvCommit, GroupCommit, HookCommit,
                             HookSettings, Manifest)
from .store.manifest import manifest_crc32
from .store.object_storage import is_url, open_storage
from .store.storage import LocalRunStorage, run_path

__all__ = [
    "CONSOLIDATED_FORMAT",
    "CONSOLIDATED_MARKER",
    "DamageError",
    "KEY_COLUMNS",
    "RunError",
    "RunReader",
    "Unit",
    "committed_files",
    "committed_units",
    "find_rank_roots",
    "iter_csv_batches",
    "load_manifest",
    "manifest_snapshot",
    "narrow_table",
    "open_run",
    "read_csv_committed",
    "run_damage",
    "run_path",
    "run_problems",
]

#: Written last into a consolidated output directory: its presence means "complete".
CONSOLIDATED_MARKER = "consolidated.json"
CONSOLIDATED_FORMAT = "dist_hooks-consolidated"


# ------------------------------------------------------------------------------------ manifest
def manifest_snapshot(run_dir: str | Path) -> tuple[Manifest, int]:
    """The checked ``run.json`` and the crc32 of the same bytes, read once: a consolidate (or a
    boundary) replacing the file between two reads could otherwise pair one manifest with
    another's fingerprint. Errors as :func:`load_manifest`."""
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: no such directory")
    data = LocalRunStorage(run_dir).read_manifest()
    if data is None:
        raise RunError(f"{run_dir}: not a dist_hooks run directory (no {layout.MANIFEST})")
    return Manifest.parse(data), manifest_crc32(data)


def load_manifest(run_dir: str | Path, data: bytes | None = None) -> Manifest:
    """The checked ``run.json`` (or ``data``, its bytes read earlier); :class:`RunError` if there
    is none, :class:`DamageError` if it cannot be parsed or is not a dist_hooks manifest of a
    version this code reads (:meth:`Manifest.parse <dist_hooks.store.manifest.Manifest.parse>`),
    or names a path or hook name no writer writes."""
    if data is None:
        return manifest_snapshot(run_dir)[0]
    return Manifest.parse(data)


@dataclass(frozen=True)
class Unit:
    """One rank's committed part of one hook: a CSV file or a Zarr group, and its commit entry."""

    rank: int
    hook: str
    commit: HookCommit = field(hash=False, compare=False)

    @property
    def kind(self) -> str:
        """``"csv"`` or ``"zarr"``."""
        return self.commit.kind

    @property
    def converged(self) -> bool:
        """A converged hook's records (the coordinator merges them)."""
        return self.commit.converged

    @property
    def rel(self) -> str:
        """Path relative to the run directory, as messages name it."""
        if isinstance(self.commit, CsvCommit):
            return self.commit.path
        return f"{layout.DATA_DIR}/{self.group}"

    @property
    def group(self) -> str:
        return self.commit.group.strip("/") if isinstance(self.commit, GroupCommit) else ""

    @property
    def records(self) -> int:
        """Committed records (CSV: data rows)."""
        return self.commit.length

    @property
    def atoms(self) -> int:
        return self.commit.atoms if isinstance(self.commit, GroupCommit) else 0

    def path(self, run_dir: str | Path) -> Path:
        """Absolute path, checked to lie inside the run directory (:class:`DamageError` if not)."""
        return run_path(run_dir, self.rel, f"{layout.MANIFEST} ({self.hook}, rank {self.rank})")


def committed_units(manifest: Manifest) -> list[Unit]:
    """Every (rank, hook) the last boundary committed, ordered by hook then rank."""
    out = [Unit(r.rank, name, c) for r in manifest.ranks for name, c in r.hooks.items()]
    return sorted(out, key=lambda u: (u.hook, u.rank))


def committed_files(run_dir: str | Path, manifest: Manifest) -> dict[tuple[int, str], dict]:
    """``{(rank, hook): {"<array>/<shard file>": (bytes, crc32)}}``: the file checksums that
    the commit records of every boundary in force reported (format.md, commit records), the
    latest entry of each file winning. A boundary file that cannot be read contributes nothing
    (callers then check those files the slow way, by decoding them)."""
    out: dict[tuple[int, str], dict] = {}
    for b in manifest.boundaries:
        try:
            entry = BoundaryEntry.parse(run_path(run_dir, b.file).read_bytes(), b.file)
        except (OSError, DamageError):
            continue
        for r in entry.ranks:
            for hook, c in r.hooks.items():
                if isinstance(c, GroupCommit) and c.files is not None:
                    d = out.setdefault((r.rank, hook), {})
                    for k, v in c.files.items():
                        d[str(k)] = (int(v[0]), int(v[1]))
    return out


def run_problems(run_dir: str | Path, m: Manifest) -> list[str]:
    """What is wrong with the run as a whole, one message each (empty when nothing is): the
    boundaries are numbered in order, each boundary file exists, parses and holds its boundary,
    the last one equals ``run.json``'s ``last``, every rank of the world (and no other) is in
    it once, and ``data.zarr``'s root nodes are Zarr groups.

    Why here, once: ``verify`` reports these, and everything that merges the ranks
    (``consolidate``, ``export`` and ``plot`` on an unconsolidated run, :meth:`RunReader.logs`)
    refuses on them before writing anything. A merge cannot see them in the ranks' own data:
    a rank dropped from the last boundary simply contributes nothing.
    """
    run_dir = Path(run_dir)
    out = []
    bs, last = m.boundaries, m.last
    prev: BoundaryEntry | None = None
    for i, b in enumerate(bs):
        if b.index != i:
            out.append(f"{layout.MANIFEST}: boundary {i} has index {b.index}")
        rel = b.file
        try:
            entry = BoundaryEntry.parse(run_path(run_dir, rel, f"{layout.MANIFEST} (boundary "
                                                 f"{i})").read_bytes(), rel)
        except FileNotFoundError:
            out.append(f"{rel}: file missing")
            continue
        except OSError as exc:
            out.append(f"{rel}: cannot be read ({exc.strerror or exc})")
            continue
        except DamageError as exc:
            out.append(str(exc))
            continue
        if entry.index != i:
            out.append(f"{rel}: holds boundary {entry.index}, expected {i}")
        if i == len(bs) - 1 and last is not None and entry != last:
            out.append(f"{rel}: differs from the last boundary recorded in {layout.MANIFEST}")
        if prev is not None:
            dropped = {d.hook for d in m.dropped or [] if d.boundary == i}
            out.extend(_regressions(prev, entry, rel, dropped))
        prev = entry
    if bs and last is None:
        out.append(f"{layout.MANIFEST}: {len(bs)} boundaries but no 'last' entry")
    if last is not None and bs and last.index != bs[-1].index:
        out.append(f"{layout.MANIFEST}: 'last' is boundary {last.index}, the list ends at "
                   f"{bs[-1].index}")
    if last is not None:
        ws = m.world_size
        ranks = [r.rank for r in last.ranks]
        seen = set(ranks)
        if len(ranks) != ws or seen != set(range(len(ranks))):
            # bounded: world_size comes from the file and may be huge
            missing = [r for r in range(min(ws, len(ranks) + 10)) if r not in seen][:10]
            dup = sorted({r for r in ranks if ranks.count(r) > 1})[:10]
            out.append(f"{layout.MANIFEST}: last boundary has ranks {sorted(seen)[:10]} for "
                       f"world size {ws}" + (f" (missing {missing})" if missing else "")
                       + (f" (repeated {dup})" if dup else ""))
    try:
        LocalRunStorage(run_dir).check_hierarchy()
    except DamageError as exc:
        out.append(str(exc))
    return out


def _regressions(prev: BoundaryEntry, entry: BoundaryEntry, rel: str,
                 dropped: set[str]) -> list[str]:
    """What boundary ``entry`` lost of ``prev``: committed data only ever grow, so each rank's
    hook of a boundary is in the next one, of the same kind, never shorter — unless the
    manifest records it as dropped at ``entry`` (``dropped``)."""
    out = []
    for old in prev.ranks:
        new = entry.rank(old.rank)
        if new is None:
            continue  # reported as a missing rank when it is the last boundary
        for name, c in old.hooks.items():
            n = new.hooks.get(name)
            if n is None and name in dropped:
                continue
            if n is None or n.kind != c.kind or n.converged != c.converged:
                out.append(f"{rel}: rank {old.rank} hook {name!r} "
                           + ("missing" if n is None else "changed kind")
                           + f" (committed at boundary {prev.index})")
            elif n.length < c.length or (isinstance(c, GroupCommit) and n.atoms < c.atoms) \
                    or (isinstance(c, CsvCommit) and n.bytes < c.bytes):
                out.append(f"{rel}: rank {old.rank} hook {name!r} shorter than at boundary "
                           f"{prev.index}")
    return out


def run_damage(run_dir: str | Path, m: Manifest, doing: str) -> DamageError | None:
    """:func:`run_problems` as the one error a tool that merges the ranks refuses with (one
    line per problem), or ``None``."""
    problems = run_problems(run_dir, m)
    if not problems:
        return None
    return DamageError(f"refusing to {doing} {run_dir}: " + "; ".join(problems[:5])
                       + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
                       + f" (`dist-hooks verify {run_dir}` lists all damage)", problems)


def find_rank_roots(run_dir: str | Path, manifest: Manifest,
                    candidates: Sequence[str | os.PathLike] = ()) -> dict[int, Path]:
    """Where each committed rank's files (logs, groups, saved state) are: its *rank root*.

    With ``storage="shared"`` that is the run directory. With ``storage="local"`` every rank
    wrote under its node's ``local_dir``; after the job those directories can be copied (or
    mounted) anywhere and passed as ``candidates``: a rank's root is the first candidate that
    holds its committed files (paths in the manifest are relative to the rank root). Ranks found
    in no candidate are absent from the result.
    """
    run_dir = Path(run_dir)
    ranks = [r.rank for r in manifest.ranks]
    if manifest.storage != "local":
        return {r: run_dir for r in ranks}
    units: dict[int, list[Unit]] = {}
    for u in committed_units(manifest):
        units.setdefault(u.rank, []).append(u)
    states = {r.rank: r.state.path if r.state is not None else None for r in manifest.ranks}
    out: dict[int, Path] = {}
    for r in ranks:
        for c in (Path(c) for c in candidates):
            marks = [c / u.rel / ("zarr.json" if u.kind == "zarr" else "")
                     for u in units.get(r, [])]
            if states.get(r):
                marks.append(c / str(states[r]))
            if any(m.exists() for m in marks):
                out[r] = c
                break
    return out


def local_storage_error(run_dir: Path, missing: Sequence[int]) -> RunError:
    """The error for a node-local run whose rank roots were not given (or lack ranks)."""
    return RunError(
        f"{run_dir} was recorded with storage='local': the logs and groups of rank(s) "
        f"{', '.join(map(str, missing))} are in the nodes' local directories, not in the run "
        f"directory. Copy each node's local directory somewhere readable (as a whole: paths "
        f"inside it are kept) and pass each with --rank-root DIR (Python: rank_roots=[...])")


# ------------------------------------------------------------------------------------ reader
class RunReader:
    """A run, read as committed. Build it with :func:`open_run`.

    Attributes: ``path`` (the run directory, or ``None`` for a consolidated output read on its
    own), ``manifest`` (``run.json``), ``ranks`` (sorted rank numbers of the last boundary),
    ``consolidated`` (the consolidated output directory in use, or ``None``; one made of an
    older state of the run is ignored) and ``summary`` (its ``consolidated.json``).
    """

    def __init__(self, path: Path | None, manifest: Manifest, consolidated: Path | None,
                 summary: dict | None, rank_roots: Sequence[str | os.PathLike] = ()) -> None:
        self.path = path
        self.manifest = manifest
        self.consolidated = consolidated
        self.summary = summary
        self.units = committed_units(manifest)
        self.ranks: list[int] = sorted(r.rank for r in manifest.ranks)
        #: rank -> directory holding its files (see :func:`find_rank_roots`)
        self.roots: dict[int, Path] = (find_rank_roots(path, manifest, rank_roots)
                                       if path is not None else {})
        self._consistent = False
        #: the ``s3://`` URL of a run read through its mirror (``path``), else ``None``
        self.url: str | None = None
        #: that mirror (:class:`~dist_hooks.tools.mirror.Mirror`), else ``None``
        self.mirror: Any = None

    def require_consistent(self, doing: str = "merge the ranks of") -> None:
        """Refuse (:class:`DamageError`, once checked, cached) to merge the ranks of a run that
        is inconsistent as a whole (:func:`run_problems`: a rank missing from the last boundary,
        boundary files that disagree): a merge would silently return part of the data."""
        if self._consistent or self.path is None:
            return
        exc = run_damage(self.path, self.manifest, doing)
        if exc is not None:
            if self.mirror is not None:  # named by its URL, not by the cache
                from .tools.mirror import rename
                rename(exc, self.mirror)
            raise exc
        self._consistent = True

    def root_of(self, rank: int, what: str) -> Path:
        """The rank root of ``rank`` (the run directory unless storage was node-local)."""
        root = self._require_run_dir(what)
        if rank in self.roots:
            return self.roots[rank]
        if self.manifest.storage == "local":
            raise local_storage_error(root, [rank])
        return root

    # --- manifest views
    @property
    def hooks(self) -> dict[str, HookSettings]:
        """``name -> settings`` (type, frequency, stage) as the manifest records them."""
        return dict(self.manifest.hooks)

    @property
    def boundaries(self) -> list[BoundarySummary]:
        return list(self.manifest.boundaries)

    def unit(self, rank: int, hook: str) -> Unit:
        for u in self.units:
            if u.rank == rank and u.hook == hook:
                return u
        raise KeyError(f"rank {rank} committed nothing for hook {hook!r}; committed: "
                       f"{sorted({(u.rank, u.hook) for u in self.units})}")

    def _require_run_dir(self, what: str) -> Path:
        if self.path is None:
            raise RunError(f"{what} needs the run directory; this consolidated output was opened "
                           f"without it (its source is no longer next to it)")
        return self.path

    # --- data
    def logs(self, hook: str = "log", *, as_table: bool = False) -> dict[str, np.ndarray] | pa.Table:
        """The CSV log of ``hook`` across ranks, committed rows only, ordered by (step, rank,
        sample_id): a dict of numpy arrays, or a pyarrow Table with ``as_table=True``."""
        table = None
        if self.consolidated is not None:
            info = (self.summary or {}).get("hooks", {}).get(hook)
            if info is not None and info.get("kind") == "csv":
                pq = info.get("parquet")
                if pq:
                    import pyarrow.parquet as papq
                    table = papq.read_table(self.consolidated / pq)
                else:
                    f = self.consolidated / info["csv"]
                    table = read_csv_committed(f, f.stat().st_size)
        if table is None:
            self.require_consistent("read the logs of")
            units = [u for u in self.units if u.hook == hook and u.kind == "csv"]
            if not units:
                known = sorted({u.hook for u in self.units if u.kind == "csv"})
                raise KeyError(f"no committed CSV log {hook!r}; logs: {known}")
            parts = [read_csv_committed(u.path(self.root_of(u.rank, "logs()")),
                                        u.commit.bytes, narrow=False)
                     for u in units]
            parts = [p for p in parts if p.num_columns]
            if not parts:
                raise KeyError(f"CSV log {hook!r} has no committed header yet")
            # narrowed together: a column must get one type across ranks
            table = sort_table(narrow_table(pa.concat_tables(parts, promote_options="default")))
        if as_table:
            return table
        return {n: c.to_numpy(zero_copy_only=False) for n, c in zip(table.column_names,
                                                                     table.columns)}

    def group(self, rank: int, hook: str) -> GroupReader:
        """Rank ``rank``'s group of ``hook``, limited to its committed records."""
        u = self.unit(rank, hook)
        if u.kind != "zarr":
            raise KeyError(f"hook {hook!r} is a CSV log; use logs({hook!r})")
        root = self.root_of(rank, "group()")
        u.path(root)  # refuses a group path outside the run
        return GroupReader(root / layout.DATA_DIR, u.group, limit_records=u.records)

    def converged(self) -> GroupReader:
        """The merged converged records of all ranks (ordered by step, rank, sample_id; one per
        (rank, sample_id)), committed ones only."""
        if self.consolidated is not None and (self.summary or {}).get("converged"):
            c = self.summary["converged"]
            return GroupReader(self.consolidated / layout.DATA_DIR, c["group"],
                               limit_records=int(c["records"]))
        root = self._require_run_dir("converged()")
        self.require_consistent("read the converged records of")
        return GroupReader(root / layout.DATA_DIR, layout.CONVERGED_GROUP,
                           limit_records=self.manifest.merged.records)

    def trajectory(self, hook: str) -> GroupReader:
        """The consolidated group of a snapshot hook (all ranks, ordered by step, rank,
        sample_id, with a ``rank`` column). Needs ``dist-hooks consolidate`` first."""
        info = (self.summary or {}).get("hooks", {}).get(hook) if self.consolidated else None
        if info is None or info.get("kind") != "zarr":
            raise RunError(f"no consolidated trajectory of hook {hook!r}: run `dist-hooks "
                           f"consolidate` first, or read the ranks with group(rank, {hook!r})")
        return GroupReader(self.consolidated / layout.DATA_DIR, info["group"],
                           limit_records=int(info["records"]))

    def snapshot_hook(self, hook: str | None = None) -> str:
        """``hook`` checked to be a snapshot hook of the run, or the only one when ``None``."""
        hooks = sorted({u.hook for u in self.units if u.kind == "zarr" and not u.converged})
        if hook is None:
            if len(hooks) == 1:
                return hooks[0]
            raise RunError(f"the run has snapshot hooks {hooks}; choose one with --hook "
                           f"(Python: hook=)")
        if hook not in hooks:
            raise RunError(f"no snapshot hook {hook!r}; the run has {hooks}")
        return hook

    def frames(self, sample_id: int, rank: int | None = None, steps: Any = None, *,
               hook: str | None = None) -> list[Any]:
        """One system's snapshots as ``ase.Atoms``, in step order (needs ASE).

        From the consolidated trajectory when there is one, else from the rank's own group
        (``rank=None``: the rank holding ``sample_id``; refused, naming them, if several do).
        ``steps``: ``"A:B"``, ``slice(A, B)`` or ``(A, B)``, A <= step < B. Each Atoms is
        :func:`~dist_hooks.ase_frames.atoms_of`'s, as ``dist-hooks export`` writes it:
        velocities set, energy and forces on a ``SinglePointCalculator``, ``info`` with
        ``step``, ``rank``, ``sample_id`` and the other record fields."""
        hook = self.snapshot_hook(hook)
        sel = Selection.of(sample_id, rank, steps)
        info = (self.summary or {}).get("hooks", {}).get(hook) if self.consolidated else None
        if info is not None:
            return group_frames([(self.trajectory(hook), None)], sel, f"frames of {hook!r}")
        ranks = sorted({u.rank for u in self.units if u.hook == hook}) if rank is None else [rank]
        return group_frames([(self.group(int(r), hook), int(r)) for r in ranks], sel,
                            f"frames of {hook!r}")

    def __repr__(self) -> str:
        where = self.url or (self.path if self.path is not None else self.consolidated)
        return (f"RunReader({str(where)!r}, world_size={self.manifest.world_size}, "
                f"boundaries={len(self.boundaries)}, consolidated={self.consolidated is not None})")


def read_consolidated_summary(out: Path) -> dict | None:
    """``consolidated.json`` of a complete consolidated output, else ``None``; one that claims
    to be complete but names a path, hook or length no consolidate writes raises
    :class:`DamageError` naming the key (:func:`check_consolidated_summary`)."""
    f = Path(out) / CONSOLIDATED_MARKER
    try:
        s = json.loads(f.read_bytes())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(s, dict) or s.get("format") != CONSOLIDATED_FORMAT or not s.get("complete"):
        return None
    check_consolidated_summary(s)
    return s


def check_consolidated_summary(s: dict, where: str = CONSOLIDATED_MARKER) -> None:
    """The names and paths of a consolidated output's summary, by the same rules as the run's
    (docs/format.md, Names and paths): every path is the one the layout gives for its hook
    (:func:`~dist_hooks.store.layout.consolidated_log`, ``consolidated_group``), every length a
    non-negative integer; :class:`DamageError` naming the key otherwise. ``source.relative``
    (where the run was) may lead anywhere: it is only ever compared, never read as data."""
    def fail(key: str, what: str) -> None:
        raise DamageError(f"{where}.{key}: {what}")

    def counts(obj: dict, key: str, *names: str) -> None:
        for n in names:
            v = obj.get(n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{key}.{n}", f"expected a non-negative integer, got {v!r:.40}")

    hooks = s.get("hooks", {})
    if not isinstance(hooks, dict):
        fail("hooks", "expected an object")
    for name, info in hooks.items():
        why = layout.name_problem(name)
        if why is not None:
            fail("hooks", f"hook name {name!r:.40} {why}")
        key = f"hooks.{name}"
        if not isinstance(info, dict):
            fail(key, "expected an object")
        if info.get("kind") == "csv":
            if info.get("csv") != layout.consolidated_log(name):
                fail(f"{key}.csv", f"expected {layout.consolidated_log(name)!r}")
            if info.get("parquet") not in (None, layout.consolidated_log(name, ".parquet")):
                fail(f"{key}.parquet", f"expected {layout.consolidated_log(name, '.parquet')!r}")
            counts(info, key, "rows")
        elif info.get("kind") == "zarr":
            if info.get("group") != layout.consolidated_group(name):
                fail(f"{key}.group", f"expected {layout.consolidated_group(name)!r}")
            counts(info, key, "records", "atoms")
        else:
            fail(f"{key}.kind", 'expected "csv" or "zarr"')
    conv = s.get("converged")
    if conv is not None:
        if not isinstance(conv, dict) or conv.get("group") != layout.CONVERGED_GROUP:
            fail("converged.group", f"expected {layout.CONVERGED_GROUP!r}")
        counts(conv, "converged", "records", "atoms")
    src = s.get("source", {})
    if not isinstance(src, dict) or not isinstance(src.get("relative", ""), str):
        fail("source.relative", "expected a string")


def default_consolidated_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "consolidated"


def open_run(path: str | os.PathLike,
             rank_roots: Sequence[str | os.PathLike] = (), *,
             storage_options: dict[str, Any] | None = None,
             cache: str | os.PathLike | None = None) -> RunReader:
    """Open a run directory, or a consolidated output directory, for reading.

    For a run directory whose default consolidated output (``RUN/consolidated``) is complete and
    was made of the current ``run.json``, the merged logs and converged group come from there
    (fast); otherwise from the per-rank files. Results are the same either way. ``rank_roots``:
    for a run recorded with ``storage="local"``, the directories holding the nodes' local
    files (see :func:`find_rank_roots`).

    ``path`` may be an ``s3://bucket/prefix`` URL (a run or a consolidated output on an object
    store): it is mirrored into ``cache`` (default ``$XDG_CACHE_HOME/dist_hooks``, i.e.
    ``~/.cache/dist_hooks``; only what changed since the last look is fetched) and read from
    there (:mod:`dist_hooks.tools.mirror`); ``reader.url`` names it, ``reader.path`` is the
    mirror. ``storage_options``: credentials and endpoint (else the ``AWS_*`` environment).
    """
    if is_url(path):
        if path[:5].lower() != "s3://":  # file:// is a local path; anything else is refused
            return open_run(open_storage(path, storage_options).root, rank_roots)
        from .tools.mirror import mirror_run, naming_url  # the tools' layer, only for a URL
        m = mirror_run(path, cache, storage_options)
        with naming_url(m):
            run = open_run(m.path, rank_roots)
        run.url, run.mirror = m.url, m
        return run
    if storage_options:
        raise RunError(f"{path}: storage_options apply to s3:// runs only")
    p = Path(path)
    if (p / layout.MANIFEST).is_file():
        manifest, crc = manifest_snapshot(p)  # one read: what is parsed is what is compared
        out = default_consolidated_dir(p)
        summary = read_consolidated_summary(out)
        if summary is not None and summary.get("source", {}).get("manifest_crc32") != crc:
            summary = None  # made of an older state of the run: stale
        return RunReader(p, manifest, out if summary is not None else None, summary,
                         rank_roots)
    summary = read_consolidated_summary(p)
    if summary is None:
        if (p / CONSOLIDATED_MARKER).exists():
            raise RunError(f"{p}: consolidated output is incomplete (no valid "
                           f"{CONSOLIDATED_MARKER}); run `dist-hooks consolidate` again")
        load_manifest(p)  # raises the usual "not a run" error
        raise RunError(f"{p}: not a run directory")
    src = (p / summary.get("source", {}).get("relative", "..")).resolve()
    source_dir: Path | None = None
    if (src / layout.MANIFEST).is_file():
        try:
            if manifest_crc32((src / layout.MANIFEST).read_bytes()) == \
                    summary["source"].get("manifest_crc32"):
                source_dir = src
        except OSError:
            pass
    # the manifest consolidated (its paths checked like run.json's), read with the source's files
    manifest = Manifest.from_json(summary.get("manifest"), f"{CONSOLIDATED_MARKER}: manifest")
    return RunReader(source_dir, manifest, p, summary, rank_roots)

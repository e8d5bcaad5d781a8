"""The run manifest ``run.json`` and the boundary files, as typed dataclasses (docs/format.md).

Why dataclasses: the manifest is the one document every writer and reader of a run agrees on;
spelling it out once, with one parser that checks every value's type and one format-version
check, replaces ``.get(...) or {}`` chains that let a damaged or hand-edited file through as
``None`` and fail later, far from the cause. :meth:`Manifest.parse` raises :class:`DamageError`
naming the key; ``to_json`` writes the same keys, in the same order, as format version 1 always
has, so a run recorded by an earlier version reads, resumes and is rewritten unchanged.

The parser is also the one place where names and paths read back from a run's files are
checked, before anything reads or writes by them (docs/format.md, "Names and paths"): hook
names are single path components (:func:`~dist_hooks.store.layout.name_problem`, the rule the
writers apply); a group, state or boundary file path is the one the layout gives for its rank,
hook and index; a CSV path is a plain relative ``.csv`` path. Every tool, ``open_run`` and
resume parse through here, so none of them can be pointed outside the run by a file.

Who writes what: every rank builds its :class:`CommitRecord` at a boundary; the coordinator
(rank 0) gathers them into a :class:`BoundaryEntry` (``boundaries/b-NNNNNN.json``), appends a
:class:`BoundarySummary` to the :class:`Manifest` and commits it (``run.json``).
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import DamageError
from . import layout
from .layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST

__all__ = ["MAX_WORLD_SIZE", "BoundaryEntry", "BoundarySummary", "CommitRecord", "CsvCommit",
           "GroupCommit", "HookCommit", "HookSettings", "Manifest", "MergedLengths", "StateFile",
           "manifest_crc32"]


#: The largest world size a manifest may name (MPI ranks are C ints).
MAX_WORLD_SIZE = (1 << 31) - 1
#: Every integer of the format fits in int64 (numpy reads lengths and offsets as int64).
_INT_LIMIT = 1 << 63
_STATE_NAME = re.compile(r"b-[0-9]{6,}\.pt")


class _Fields:
    """Typed access to one JSON object, each failure naming ``where`` and the key."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise DamageError(f"{where}: expected an object, got {_shown(obj)}")
        self.obj, self.where = obj, where

    def _get(self, key: str, types: tuple[type, ...], what: str, optional: bool, default: Any):
        if key not in self.obj:
            if optional:
                return default
            raise DamageError(f"{self.where}: '{key}' missing")
        v = self.obj[key]
        if v is None and optional:
            return default
        # bool is an int to Python, never to us
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise DamageError(f"{self.where}.{key}: expected {what}, got {_shown(v)}")
        return v

    def int(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        v = self._get(key, (int,), "an integer", optional, default)
        if isinstance(v, int) and not -_INT_LIMIT <= v < _INT_LIMIT:
            raise DamageError(f"{self.where}.{key}: {_shown(v)} is out of range")
        return v

    def count(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        """A length, index or checksum: an integer in [0, 2**63)."""
        v = self.int(key, optional=optional, default=default)
        if isinstance(v, int) and v < 0:
            raise DamageError(f"{self.where}.{key}: {v} is negative")
        return v

    def num(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        return self._get(key, (int, float), "a number", optional, default)

    def str(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        return self._get(key, (str,), "a string", optional, default)

    def bool(self, key: str, *, optional: bool = False, default: Any = None) -> Any:
        return self._get(key, (bool,), "true or false", optional, default)

    def obj_(self, key: str, *, optional: bool = False) -> dict:
        return self._get(key, (dict,), "an object", optional, {})

    def list(self, key: str, *, optional: bool = False) -> list:
        return self._get(key, (list,), "a list", optional, [])

    def int_map(self, key: str, *, optional: bool = False) -> dict[str, int]:
        d = self.obj_(key, optional=optional)
        for k, v in d.items():
            if not _is_count(v):
                raise DamageError(f"{self.where}.{key}.{_shown(k)}: expected a non-negative "
                                  f"integer, got {_shown(v)}")
        return dict(d)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INT_LIMIT


def _shown(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_or_none_list(f: _Fields, key: str) -> list[int | None]:
    out = f.list(key)
    for i, v in enumerate(out):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                              or not -_INT_LIMIT <= v < _INT_LIMIT):
            raise DamageError(f"{f.where}.{key}[{i}]: expected an integer or null, got {_shown(v)}")
    return list(out)


def _hook_name(name: str, where: str) -> str:
    """A hook name read from a run's file, checked by the writers' rule (one rule)."""
    why = layout.name_problem(name)
    if why is not None:
        raise DamageError(f"{where}: hook name {_shown(name)} {why}")
    return name


def _rel_path(rel: str, where: str) -> str:
    """A path read from a run's file: plain and relative (docs/format.md, Names and paths)."""
    why = layout.relative_path_problem(rel)
    if why is not None:
        raise DamageError(f"{where}: path {_shown(rel)} {why}")
    return rel


@dataclass
class StateFile:
    """A rank's saved simulation state: ``path`` relative to its rank root."""

    path: str
    bytes: int
    crc32: int

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "StateFile":
        f = _Fields(obj, where)
        return cls(_rel_path(f.str("path"), f"{where}.path"), f.count("bytes"), f.count("crc32"))

    @classmethod
    def of(cls, path: str, data: bytes) -> "StateFile":
        """The entry of a state file being written with ``data``."""
        return cls(path, len(data), zlib.crc32(data))

    def mismatch(self, data: bytes) -> str | None:
        """What is wrong with ``data`` as this file's content, or ``None``."""
        if len(data) != self.bytes:
            return f"file is {len(data)} bytes, committed {self.bytes}"
        if zlib.crc32(data) != self.crc32:
            return f"crc32 mismatch over bytes [0, {len(data)})"
        return None

    def to_json(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "crc32": self.crc32}


@dataclass
class CsvCommit:
    """Committed lengths of one rank's CSV log: ``path`` relative to the rank root."""

    path: str
    bytes: int
    rows: int
    crc32: int
    kind = "csv"
    converged = False

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "CsvCommit":
        f = _Fields(obj, where)
        path = _rel_path(f.str("path"), f"{where}.path")
        if not path.endswith(".csv"):
            raise DamageError(f"{where}.path: path {_shown(path)} is not a .csv file")
        return cls(path, f.count("bytes"), f.count("rows"), f.count("crc32"))

    @property
    def length(self) -> int:
        """Committed data rows."""
        return self.rows

    def to_json(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "rows": self.rows, "crc32": self.crc32,
                "kind": self.kind, "converged": False}


@dataclass
class GroupCommit:
    """Committed lengths of one rank's record group: ``group`` inside ``data.zarr``; ``crc32``
    per field; ``files``: ``{"<array>/<shard file>": [bytes, crc32]}`` written since the previous
    boundary (absent in runs recorded before it was added)."""

    group: str
    records: int
    atoms: int
    crc32: dict[str, int]
    converged: bool = False
    files: dict[str, list[int]] | None = None
    kind = "zarr"

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "GroupCommit":
        f = _Fields(obj, where)
        files = f.obj_("files", optional=True) if "files" in obj else None
        for k, v in (files or {}).items():
            if not isinstance(v, list) or len(v) != 2 or not all(_is_count(x) for x in v):
                raise DamageError(f"{where}.files.{_shown(k)}: expected [bytes, crc32], got "
                                  f"{_shown(v)}")
        return cls(f.str("group"), f.count("records"), f.count("atoms"),
                   f.int_map("crc32", optional=True), bool(f.bool("converged", optional=True)),
                   files)

    @property
    def length(self) -> int:
        """Committed records."""
        return self.records

    def to_json(self) -> dict:
        out: dict[str, Any] = {"group": self.group, "records": self.records, "atoms": self.atoms,
                               "crc32": dict(self.crc32)}
        if self.files is not None:
            out["files"] = self.files
        out.update(kind=self.kind, converged=self.converged)
        return out


HookCommit = Union[CsvCommit, GroupCommit]


def _hook_commit(obj: Any, where: str) -> HookCommit:
    kind = obj.get("kind", "zarr" if "group" in obj else "csv") if isinstance(obj, dict) else None
    if kind == "csv":
        return CsvCommit.from_json(obj, where)
    if kind == "zarr":
        return GroupCommit.from_json(obj, where)
    raise DamageError(f"{where}.kind: expected \"csv\" or \"zarr\", got {_shown(kind)}")


@dataclass
class CommitRecord:
    """What one rank commits at a boundary (it sends this to the coordinator)."""

    rank: int
    step: int | None
    final: bool
    signal: int | None
    time: float
    hooks: dict[str, HookCommit] = field(default_factory=dict)
    state: StateFile | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "CommitRecord":
        f = _Fields(obj, where)
        rank = f.count("rank")
        hooks = {}
        for k, v in f.obj_("hooks").items():
            place = f"{where}.hooks.{_hook_name(k, f'{where}.hooks')}"
            hooks[k] = c = _hook_commit(v, place)
            if isinstance(c, GroupCommit) and c.group != layout.hook_group(rank, k):
                raise DamageError(f"{place}.group: {_shown(c.group)}, the layout puts rank "
                                  f"{rank}'s group of {k!r} at {layout.hook_group(rank, k)!r}")
        state = (StateFile.from_json(obj["state"], f"{where}.state")
                 if obj.get("state") is not None else None)
        if state is not None:
            folder, _, name = state.path.rpartition("/")
            if folder != layout.state_dir(rank) or not _STATE_NAME.fullmatch(name):
                raise DamageError(f"{where}.state.path: {_shown(state.path)}, the layout puts "
                                  f"rank {rank}'s states at {layout.state_dir(rank)}/b-NNNNNN.pt")
        return cls(rank, f.int("step", optional=True), bool(f.bool("final")),
                   f.int("signal", optional=True), f.num("time"), hooks, state)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rank": self.rank, "step": self.step, "final": self.final,
                               "signal": self.signal, "time": self.time,
                               "hooks": {k: v.to_json() for k, v in self.hooks.items()}}
        if self.state is not None:
            out["state"] = self.state.to_json()
        return out


@dataclass
class MergedLengths:
    """Committed lengths of the merged converged group ``data.zarr/converged``, and the crc32
    of each of its fields (absent in runs recorded before it was added)."""

    records: int = 0
    atoms: int = 0
    crc32: dict[str, int] | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "MergedLengths":
        f = _Fields(obj, where)
        return cls(f.count("records", optional=True, default=0),
                   f.count("atoms", optional=True, default=0),
                   f.int_map("crc32") if "crc32" in obj else None)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"records": self.records, "atoms": self.atoms}
        if self.crc32 is not None:
            out["crc32"] = dict(self.crc32)
        return out


@dataclass
class BoundaryEntry:
    """One committed boundary: ``boundaries/b-NNNNNN.json``, and ``last`` in ``run.json``."""

    index: int
    time: float
    all_final: bool
    steps: list[int | None]
    ranks: list[CommitRecord]
    merged: MergedLengths

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "BoundaryEntry":
        f = _Fields(obj, where)
        ranks = [CommitRecord.from_json(r, f"{where}.ranks[{i}]")
                 for i, r in enumerate(f.list("ranks"))]
        return cls(f.count("index"), f.num("time"), bool(f.bool("all_final")),
                   _int_or_none_list(f, "steps"), ranks,
                   MergedLengths.from_json(f.obj_("merged", optional=True), f"{where}.merged"))

    @classmethod
    def parse(cls, data: bytes, where: str) -> "BoundaryEntry":
        """A boundary file's bytes; :class:`DamageError` naming ``where`` if they do not parse."""
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamageError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_json(obj, where)

    def rank(self, rank: int) -> CommitRecord | None:
        """The commit record of ``rank``, or None."""
        return next((r for r in self.ranks if r.rank == rank), None)

    def to_json(self) -> dict:
        return {"index": self.index, "time": self.time, "all_final": self.all_final,
                "steps": list(self.steps), "ranks": [r.to_json() for r in self.ranks],
                "merged": self.merged.to_json()}


@dataclass
class BoundarySummary:
    """One entry of ``run.json``'s ``boundaries`` list."""

    index: int
    time: float
    steps: list[int | None]
    file: str
    converged_count: int
    all_final: bool

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "BoundarySummary":
        f = _Fields(obj, where)
        index, file = f.count("index"), f.str("file")
        if file != layout.boundary_file(index):
            raise DamageError(f"{where}.file: {_shown(file)}, the layout puts boundary {index} "
                              f"at {layout.boundary_file(index)!r}")
        return cls(index, f.num("time"), _int_or_none_list(f, "steps"), file,
                   f.count("converged_count"), bool(f.bool("all_final")))

    def to_json(self) -> dict:
        return {"index": self.index, "time": self.time, "steps": list(self.steps),
                "file": self.file, "converged_count": self.converged_count,
                "all_final": self.all_final}


@dataclass
class HookSettings:
    """How a hook of the run was configured (``run.json``'s ``hooks``). ``backend``: where a
    LoggingHook's rows go (``"csv"``, ``"tensorboard"``, ``"custom"``), so that the tools can say
    why a log has no committed file; absent (None) for other hooks and in older manifests, and
    then not written, so those round-trip unchanged."""

    type: str
    frequency: int
    stage: str
    backend: str | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "HookSettings":
        f = _Fields(obj, where)
        return cls(f.str("type"), f.int("frequency"), f.str("stage"), f.str("backend", optional=True))

    def to_json(self) -> dict:
        out = {"type": self.type, "frequency": self.frequency, "stage": self.stage}
        if self.backend is not None:
            out["backend"] = self.backend
        return out


@dataclass
class DroppedHook:
    """A hook a resume dropped (``Run(drop_hooks=...)``): from boundary ``boundary`` on no commit
    record names it; ``ranks`` holds each rank's last commit entry of it (its files stay)."""

    hook: str
    boundary: int
    ranks: dict[int, HookCommit]

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "DroppedHook":
        f = _Fields(obj, where)
        name = _hook_name(f.str("hook"), where)
        ranks = {}
        for k, v in f.obj_("ranks").items():
            if not re.fullmatch(r"[0-9]{1,9}", k):
                raise DamageError(f"{where}.ranks: key {_shown(k)} is not a rank")
            ranks[int(k)] = _hook_commit(v, f"{where}.ranks.{k}")
        return cls(name, f.int("boundary"), ranks)

    def to_json(self) -> dict:
        return {"hook": self.hook, "boundary": self.boundary,
                "ranks": {str(r): c.to_json() for r, c in self.ranks.items()}}


@dataclass
class Manifest:
    """``run.json``: the run's settings and its committed boundaries (docs/format.md)."""

    world_size: int
    launcher: str
    storage: str
    job_id: str | None = None
    checkpoint_every: int | None = None
    settings: dict = field(default_factory=dict)
    hooks: dict[str, HookSettings] = field(default_factory=dict)
    boundaries: list[BoundarySummary] = field(default_factory=list)
    last: BoundaryEntry | None = None
    dist_hooks_version: str = ""
    created: float = 0.0
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: hooks a resume left out (``Run(drop_hooks=...)``); additive: absent in runs that dropped
    #: none
    dropped: list[DroppedHook] | None = None

    @classmethod
    def parse(cls, data: bytes, where: str = MANIFEST) -> "Manifest":
        """``run.json``'s bytes, checked: JSON, format name, format version (the one check of
        it) and every value's type; :class:`DamageError` naming the key otherwise."""
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamageError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_json(obj, where)

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST) -> "Manifest":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise DamageError(f"{where}: not a {FORMAT_NAME} manifest")
        if obj.get("format_version") != FORMAT_VERSION:
            raise DamageError(f"{where}: format version {obj.get('format_version')}, this "
                              f"dist_hooks reads version {FORMAT_VERSION}")
        f = _Fields(obj, where)
        world = f.int("world_size")
        if not 1 <= world <= MAX_WORLD_SIZE:
            raise DamageError(f"{where}.world_size: {world} is not an integer in "
                              f"[1, {MAX_WORLD_SIZE}]")
        hooks = {_hook_name(k, f"{where}.hooks"): HookSettings.from_json(v, f"{where}.hooks.{k}")
                 for k, v in f.obj_("hooks", optional=True).items()}
        bounds = [BoundarySummary.from_json(b, f"{where}.boundaries[{i}]")
                  for i, b in enumerate(f.list("boundaries", optional=True))]
        last = (BoundaryEntry.from_json(obj["last"], f"{where}.last")
                if obj.get("last") is not None else None)
        dropped = ([DroppedHook.from_json(d, f"{where}.dropped[{i}]")
                    for i, d in enumerate(f.list("dropped"))] if "dropped" in obj else None)
        return cls(world, f.str("launcher"), f.str("storage"), f.str("job_id", optional=True),
                   f.int("checkpoint_every", optional=True), f.obj_("settings", optional=True),
                   hooks, bounds, last, f.str("dist_hooks_version", optional=True, default=""),
                   f.num("created", optional=True, default=0.0), dropped=dropped)

    def to_json(self) -> dict:
        out = {"format": self.format, "format_version": self.format_version,
               "dist_hooks_version": self.dist_hooks_version, "created": self.created,
               "world_size": self.world_size, "launcher": self.launcher, "job_id": self.job_id,
               "storage": self.storage, "checkpoint_every": self.checkpoint_every,
               "settings": self.settings,
               "hooks": {k: v.to_json() for k, v in self.hooks.items()},
               "boundaries": [b.to_json() for b in self.boundaries],
               "last": self.last.to_json() if self.last is not None else None}
        if self.dropped is not None:  # additive: older readers ignore it
            out["dropped"] = [d.to_json() for d in self.dropped]
        return out

    def encode(self) -> bytes:
        """The bytes of ``run.json`` (indented, as every version wrote it)."""
        return json.dumps(self.to_json(), indent=1).encode()

    # -- views every reader needs
    @property
    def ranks(self) -> list[CommitRecord]:
        """The commit records of the boundary in force (empty before the first boundary)."""
        return list(self.last.ranks) if self.last is not None else []

    @property
    def merged(self) -> MergedLengths:
        """Committed lengths of ``data.zarr/converged`` (zero before the first boundary)."""
        return self.last.merged if self.last is not None else MergedLengths()


def manifest_crc32(data: bytes) -> int:
    """crc32 of ``run.json``'s bytes: identifies the committed state a consolidation was made of."""
    return zlib.crc32(data)

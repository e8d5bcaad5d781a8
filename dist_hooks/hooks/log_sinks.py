"""Where ``LoggingHook`` puts its rows: one ``LogSink`` per backend, chosen once when the hook is built.

The hook's writer thread hands a sink one block at a time: every firing since the last block, as
columns of ``len(steps) * B`` rows (B systems per firing, firings in order), the integer columns of
``store/csv_log.INT_COLUMNS`` first, then the float scalars (``None``: a column left empty). A sink
is opened at the hook's first firing, when the rank is known, and only ever used from the writer
thread, so it needs no locking; a resumed run first cuts it back with ``resume`` (main thread, at
the first firing, before any block). ``start(names)`` comes next, also there and then: the
columns are known at the first firing, and a CSV gets its header at once. The hook flushes the
sink after every block, so what a live reader sees is always whole blocks.
"""
from __future__ import annotations

import os
import posixpath
import time
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..errors import DamageError, MissingDependencyError
from ..store.csv_log import CsvLog
from ..store.object_storage import is_url, open_storage
from ..store.storage import RunStorage

#: one block of rows: column name -> values (``None``: the column is left empty)
Columns = Mapping[str, "np.ndarray | None"]


class LogSink(ABC):
    """A destination for LoggingHook's blocks of rows."""

    #: the file or directory written (``LoggingHook.path``): a local ``Path``, or the ``s3://``
    #: URL of a log on an object store; None for sinks that write nothing
    path: Path | str | None = None

    @abstractmethod
    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        """Write one block: ``columns`` hold ``len(steps)`` firings of equally many rows each."""

    def resume(self, resume_point: dict) -> None:
        """Cut back to the committed entry of a resumed run (what ``sync`` returned); by default
        there is nothing to cut back."""

    def start(self, names: Sequence[str]) -> None:
        """The column names every block will have, before the first block; by default unused."""

    def flush(self) -> None:
        """Hand what was appended to the OS (or the consumer)."""

    def sync(self) -> dict:
        """Make it durable and return what a checkpoint records to resume from ({}: nothing)."""
        return {}

    def close(self) -> None:
        """Release files; called once, after the last flush."""


def split_log_path(log_path: str) -> tuple[str, str]:
    """``(root, name)``: the directory (or object-store prefix) that holds every rank's CSV, and
    under it one rank's file name with ``{rank}`` to format. ``{rank}`` in ``log_path`` is
    formatted (the root is what comes before its path component); a ``.csv`` path gets the rank
    inserted (``log.csv`` -> ``log.rank-00003.csv``); any other path is a directory holding
    ``rank-00003.csv``. Plain ``/``-separated text, so a local path and an ``s3://`` URL split
    alike."""
    s = log_path if log_path in ("/", "") else log_path.rstrip("/")
    if "{rank" in s:
        cut = s.rfind("/", 0, s.index("{rank"))
        return (s[:cut] or "/", s[cut + 1:]) if cut >= 0 else (".", s)
    head, name = posixpath.split(s)
    if is_csv_file_path(name):
        stem, suffix = posixpath.splitext(name)
        stem = stem.replace("{", "{{").replace("}", "}}")
        return head or ".", f"{stem}.rank-{{rank:05d}}{suffix}"
    return s or ".", "rank-{rank:05d}.csv"


def is_csv_file_path(log_path: str | os.PathLike) -> bool:
    return PurePosixPath(os.fspath(log_path)).suffix.lower() == ".csv"


class CsvPlace:
    """Where a CSV backend's logs lie: the storage of their directory (a local one, or an
    ``s3://`` prefix: :func:`~dist_hooks.store.object_storage.open_storage`, credentials from
    ``storage_options`` or the AWS environment) and each rank's file in it. Opened when the
    hook is built, so an unwritable directory, bad credentials or a dead endpoint fail then."""

    def __init__(self, log_path: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        given = os.fspath(log_path)
        self.root, self._name = split_log_path(given)
        if is_url(given) and not is_url(self.root):
            raise ValueError(f"log_path {given!r}: its logs must lie under a bucket "
                             "(s3://bucket/prefix/...), and {rank} cannot name the bucket")
        self.storage: RunStorage = open_storage(self.root, storage_options)
        self.local = self.storage.is_local
        if self.local:
            check_writable_dir(Path(self.root))

    def rel(self, rank: int) -> str:
        """Rank ``rank``'s log, relative to :attr:`storage`."""
        return self._name.format(rank=rank)

    def url(self, rank: int) -> str:
        """Where rank ``rank``'s log is: an absolute local path or an ``s3://`` URL
        (``RunStorage.url``)."""
        return self.storage.url(self.rel(rank))

    def path(self, rank: int) -> Path | str:
        """:meth:`url` as a ``Path`` for a local log."""
        return Path(self.url(rank)) if self.local else self.url(rank)

    def open(self, rank: int, cut: int | None = None) -> CsvLog:
        """Rank ``rank``'s ``CsvLog``: continued as it is, or cut back to ``cut`` bytes."""
        return CsvLog(self.storage.log_file(self.rel(rank)), cut)


class CsvLogSink(LogSink):
    """One CSV per rank (``store/csv_log.CsvLog``: pyarrow encodes each block in C++, GIL released):
    a local file opened for append, or on an object store one part per block (one PUT each).
    Opened at ``resume`` (cut back to the committed bytes, whose crc32 is checked) or at
    ``start`` (continued as it is)."""

    def __init__(self, place: CsvPlace, rank: int):
        self._place, self._rank = place, rank
        self.path = place.path(rank)
        self._url = place.url(rank)
        self._log: CsvLog | None = None

    def resume(self, resume_point: dict) -> None:
        rp = resume_point
        self._log = self._place.open(self._rank, cut=int(rp.get("bytes", 0)))
        if ("crc32" in rp and self._log.crc32 != rp["crc32"]) or \
                ("rows" in rp and self._log.rows != int(rp["rows"])):
            raise DamageError(f"{self._url}: the committed first {rp['bytes']} bytes do not match "
                              "their checksum (or row count) in run.json; the file was changed "
                              "after the checkpoint")

    def start(self, names: Sequence[str]) -> None:
        if self._log is None:
            self._log = self._place.open(self._rank)
        self._log.write_header(list(names))  # nothing when a restart continues the file

    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        nrows = len(next(iter(columns.values())))  # the first column (step) is never empty
        self._log.append({k: (pa.nulls(nrows, pa.float64()) if v is None else v) for k, v in columns.items()})

    def flush(self) -> None:
        self._log.flush()

    def sync(self) -> dict:
        self._log.sync()
        return {"path": self._url, "bytes": self._log.size, "rows": self._log.rows,
                "crc32": self._log.crc32}

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


#: ``per_system=None``: per-sample tags while a firing holds at most this many systems
PER_SYSTEM_MAX = 64


class TensorBoardLogSink(LogSink):
    """One TensorBoard run per rank (``log_path/rank-00003``), one event per firing holding every
    float scalar: ``name/mean``, ``name/min``, ``name/max`` over the firing's systems (finite values
    only; NaN when none is), and with ``per_system`` one ``name/sample_<sample_id>`` tag per system.

    Why by sample id: a batch position (``graph_idx``) changes meaning when a converged system is
    replaced; the sample id follows one system for its whole life. Why summaries: thousands of
    per-system curves are unreadable, three per quantity stay readable at any batch size.
    ``per_system=None`` keeps per-sample tags while a firing holds at most :data:`PER_SYSTEM_MAX`
    systems. The integer columns are not logged. A resumed run appends events to the run's
    directory (nothing is cut back: TensorBoard's events carry no committed length).
    """

    def __init__(self, log_path: Path, per_system: bool | None, rank: int):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise MissingDependencyError("backend='tensorboard' needs the tensorboard package: "
                                         "pip install 'dist_hooks[tensorboard]'") from exc
        self._event, self._summary = Event, Summary
        self.per_system = per_system
        self.path = log_path / f"rank-{rank:05d}"
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.path))

    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        n = len(steps)
        B = len(next(iter(columns.values()))) // n
        per_system = B <= PER_SYSTEM_MAX if self.per_system is None else self.per_system
        ids = columns["sample_id"].reshape(n, B)
        Value = self._summary.Value
        values: list[list] = [[] for _ in range(n)]
        for name, col in columns.items():
            if col is None or col.dtype.kind != "f":  # empty, or one of the integer columns
                continue
            vals = col.reshape(n, B)
            for stat, per_step in zip(("mean", "min", "max"), _finite_stats(vals)):
                tag = f"{name}/{stat}"
                for i, x in enumerate(per_step.tolist()):
                    values[i].append(Value(tag=tag, simple_value=x))
            if per_system:
                for i in range(n):
                    values[i].extend(Value(tag=f"{name}/sample_{sid}", simple_value=x)
                                     for sid, x in zip(ids[i].tolist(), vals[i].tolist()))
        now = time.time()
        for step, vs in zip(steps, values):
            self._writer.add_event(self._event(wall_time=now, step=int(step),
                                               summary=self._summary(value=vs)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _finite_stats(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of each row's finite values (NaN for a row without any), vectorised."""
    ok = np.isfinite(vals)
    count = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, vals, 0.0).sum(axis=1) / count
    none = count == 0
    lo = np.where(ok, vals, np.inf).min(axis=1)
    hi = np.where(ok, vals, -np.inf).max(axis=1)
    lo[none] = hi[none] = np.nan
    return mean, lo, hi


class CustomLogSink(LogSink):
    """The user's ``writer_fn(step, rows)``, once per firing: rows a list of dicts (one per system,
    empty columns left out), or with ``columnar=True`` one dict of numpy columns (empty ones None)."""

    def __init__(self, writer_fn: Callable[[int, Any], None], columnar: bool, rank: int):
        self.writer_fn = writer_fn
        self.columnar = columnar

    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        B = len(next(iter(columns.values()))) // len(steps)
        for i, step in enumerate(steps):
            block = {k: (None if v is None else v[i * B:(i + 1) * B]) for k, v in columns.items()}
            if self.columnar:
                self.writer_fn(step, block)
            else:
                keys = [k for k in block if block[k] is not None]
                rows = [dict(zip(keys, vals)) for vals in zip(*(block[k].tolist() for k in keys))]
                self.writer_fn(step, rows)


def check_writable_dir(path: Path) -> None:
    """Create ``path`` and fail now, with the path named, if we cannot write there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create log directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"log directory {path} is not writable")

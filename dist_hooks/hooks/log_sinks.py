"""Where ``LoggingHook`` puts its rows: one ``LogSink`` per backend, chosen once when the hook is built.

The hook's writer thread hands a sink one block at a time: every firing since the last block, as
columns of ``len(steps) * B`` rows (B systems per firing, firings in order), the integer columns of
``store/csv_log.INT_COLUMNS`` first, then the float scalars (``None``: a column left empty). A sink
is opened at the hook's first firing, when the rank is known, and only ever used from the writer
thread, so it needs no locking; a resumed run first cuts it back with ``resume`` (main thread, at
the first firing, before any block).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..errors import DamageError
from ..store.csv_log import CsvLog

#: one block of rows: column name -> values (``None``: the column is left empty)
Columns = Mapping[str, "np.ndarray | None"]


class LogSink(ABC):
    """A destination for LoggingHook's blocks of rows."""

    #: the file or directory written (``LoggingHook.path``); None for sinks that write nothing
    path: Path | None = None

    @abstractmethod
    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        """Write one block: ``columns`` hold ``len(steps)`` firings of equally many rows each."""

    def resume(self, resume_point: dict) -> None:
        """Cut back to the committed entry of a resumed run (what ``sync`` returned); by default
        there is nothing to cut back."""

    def flush(self) -> None:
        """Hand what was appended to the OS (or the consumer)."""

    def sync(self) -> dict:
        """Make it durable and return what a checkpoint records to resume from ({}: nothing)."""
        return {}

    def close(self) -> None:
        """Release files; called once, after the last flush."""


def csv_rank_path(log_path: Path, rank: int) -> Path:
    """This rank's CSV: ``{rank}`` formatted, a ``.csv`` path with the rank inserted
    (``log.csv`` -> ``log.rank-00003.csv``), otherwise ``log_path/rank-00003.csv``."""
    s = str(log_path)
    if "{rank" in s:
        return Path(s.format(rank=rank))
    if is_csv_file_path(log_path):
        return log_path.with_name(f"{log_path.stem}.rank-{rank:05d}{log_path.suffix}")
    return log_path / f"rank-{rank:05d}.csv"


def is_csv_file_path(log_path: Path) -> bool:
    return log_path.suffix.lower() == ".csv"


class CsvLogSink(LogSink):
    """One CSV per rank (``store/csv_log.CsvLog``: pyarrow encodes each block in C++, GIL released),
    opened for append; resumed by cutting it back to the committed bytes and checking their crc32."""

    def __init__(self, log_path: Path, rank: int):
        self.path = csv_rank_path(log_path, rank)
        self._log = CsvLog(self.path)

    def resume(self, resume_point: dict) -> None:
        rp = resume_point
        self._log.truncate(int(rp.get("bytes", 0)), int(rp.get("rows", 0)))
        if "crc32" in rp and self._log.crc32 != rp["crc32"]:
            raise DamageError(f"{self.path}: the committed first {rp['bytes']} bytes do not match "
                              "their checksum in run.json; the file was changed after the checkpoint")

    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        nrows = len(next(iter(columns.values())))  # the first column (step) is never empty
        self._log.append({k: (pa.nulls(nrows, pa.float64()) if v is None else v) for k, v in columns.items()})

    def flush(self) -> None:
        self._log.flush()

    def sync(self) -> dict:
        self._log.sync()
        return {"path": str(self.path), "bytes": self._log.size, "rows": self._log.rows, "crc32": self._log.crc32}

    def close(self) -> None:
        self._log.close()


class TensorBoardLogSink(LogSink):
    """One TensorBoard run per rank (``log_path/rank-00003``): each float scalar of each system as
    ``add_scalar(f"{name}/graph_{i}", value, step)``; the integer columns are not logged. A resumed
    run appends events to the run's directory (nothing is cut back)."""

    def __init__(self, log_path: Path, rank: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("backend='tensorboard' needs the tensorboard package: "
                              "pip install 'dist_hooks[tensorboard]'") from exc
        self.path = log_path / f"rank-{rank:05d}"
        self._writer = SummaryWriter(log_dir=str(self.path))

    def append(self, columns: Columns, steps: Sequence[int]) -> None:
        B = len(next(iter(columns.values()))) // len(steps)
        for name, col in columns.items():
            if col is None or col.dtype.kind != "f":  # empty, or one of the integer columns
                continue
            vals = col.reshape(len(steps), B)
            for i, step in enumerate(steps):
                for g in range(B):
                    self._writer.add_scalar(f"{name}/graph_{g}", float(vals[i, g]), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


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

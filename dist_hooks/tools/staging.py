"""Where consolidate's output is built and how it is published: one at a time, never half.

Everything is written into a hidden temporary directory next to the output (``.OUT.tmp-*``),
then renamed into place, the previous output first renamed aside (``.OUT.old-*``) and removed
after. A killed consolidate leaves only such temporaries, which the next one removes (under the
run's lock, so never those of one still running).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import LockHeldError, RunError
from ..store import layout
from ..store.atomic_store import sync_dir

__all__ = ["LOCK_NAME", "check_out", "new_temporary", "publish", "remove_stale", "run_lock"]

LOCK_NAME = ".consolidate.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, out: Path) -> Iterator[Path]:
    """Exclusive, non-blocking ``flock`` on ``RUN/.consolidate.lock`` (next to the output when
    the run directory is read-only). The kernel releases it when the process dies, so a killed
    consolidate never leaves a stale lock."""
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        lock = out.parent / f".{out.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeldError(f"another `dist-hooks consolidate` of {run_dir} is running "
                                f"(pid {holder}, lock {lock}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _temporary_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{32}}$")


def remove_stale(out: Path) -> int:
    """Temporaries of killed consolidates of ``out`` (only ever called under the lock)."""
    pat, n = _temporary_pattern(out), 0
    for e in os.scandir(out.parent):
        if pat.match(e.name):
            shutil.rmtree(e.path, ignore_errors=True)
            n += 1
    return n


def check_out(run_dir: Path, out: Path) -> None:
    """Refuse an output that would replace the run, or lie inside its own files."""
    check_out_place(PurePosixPath(run_dir.resolve().as_posix()),
                    PurePosixPath(out.resolve().as_posix()), str(out))


def check_out_place(r: PurePosixPath, o: PurePosixPath, shown: str) -> None:
    """:func:`check_out`'s rules for two places of one namespace (resolved paths, or the
    prefixes of one bucket): the output must not be the run, hold it, or lie in its files."""
    if o == r or r.is_relative_to(o):
        raise RunError(f"--out {shown} would replace the run directory itself")
    for part in (layout.DATA_DIR, layout.LOGS_DIR, "boundaries", "state", layout.MANIFEST):
        if o == r / part or o.is_relative_to(r / part):
            raise RunError(f"--out {shown} lies inside the run's own {part}; choose another place")


def new_temporary(out: Path) -> Path:
    """A fresh, empty temporary directory for building ``out``."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` into place as ``out``, replacing any previous output."""
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        os.rename(out, trash)
    os.rename(tmp, out)
    sync_dir(out.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)

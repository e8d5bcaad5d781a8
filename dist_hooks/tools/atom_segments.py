"""The atom arrays of a consolidated trajectory group: each rank's committed rows, one segment.

Why segments (format: ``docs/format.md``, "Consolidated output"): atom rows are nearly all of a
run's bytes. Ordering them by (step, rank, sample) like the records would mean decoding,
reordering and re-encoding every one of them; measured, that ran at a twentieth of a file
copy. Instead each rank's rows stay in the rank's own order, as one segment that starts on a
shard boundary of the output array, and each record says where its atoms are
(``atoms_start``, ``n_atoms``). Every source shard file that holds only committed rows is then
copied byte for byte (:mod:`~dist_hooks.store.shard_files` checks its index and folds its decoded
rows into the committed crc32 on the way). A rank's last shard that also holds rows written
after the last boundary is decoded, and only its committed rows are written again through zarr,
so that no uncommitted row reaches the output. A source whose chunking or codecs differ from
the output's is copied through zarr, in shard-sized pieces.

Work runs in a few threads, one (field, rank) pair each: decoding and file I/O release the GIL.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from ..reader import DamageError
from ..store.atomic_store import AtomicLocalStore, fsync_file, fsync_tree
from ..store.checksums import fd_crc32
from ..store.array_layout import parse_array, with_names
from ..store.layout import array_attributes, array_dims
from ..store.shard_files import ShardDamage, ShardLayout, read_shard_rows

__all__ = ["Segment", "SegmentWriter", "plan_starts"]


@dataclass
class Segment:
    """One rank's committed atom rows of one hook, and where they go in the output."""

    rank: int
    data_root: Path          #: the Zarr root holding the rank's group (RUN/data.zarr, or a
    #: node-local copy's)
    group: str               #: the rank's record group, relative to the data root
    place: str               #: that group, relative to the run (for messages)
    atoms: int               #: committed atom rows
    expect_crc: dict[str, int] = field(default_factory=dict)
    #: ``{"<field>/<shard file>": (bytes, crc32)}`` as the commit records reported them
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    start: int = 0           #: first output row (set by :func:`plan_starts`)
    #: per field, how its rows were checked: "files" (each shard file against the checksum its
    #: writer took), "rows" (decoded, against the committed crc32) or "index" (--no-checksums)
    checked: dict[str, str] = field(default_factory=dict)


def plan_starts(segments: list[Segment], unit_rows: int) -> int:
    """Place segments one after another, each starting on a multiple of ``unit_rows`` (the
    output's shard, or chunk, rows); returns the output's row count."""
    pos = 0
    end = 0
    for s in segments:
        s.start = pos
        end = pos + s.atoms
        pos += -(-s.atoms // unit_rows) * unit_rows
    return end


def _unit_rows(meta: dict) -> int:
    return parse_array(meta).file_rows


class SegmentWriter:
    """Places ``segments`` (on construction: reads metadata only, sets each ``start``) and then,
    in :meth:`run`, creates ``group/<field>`` in ``store`` for each atom field and fills it.

    The output arrays take the first segment's metadata (chunking, codecs). Split in two so the
    caller can write the records, which need the starts, while the atoms are copied.
    """

    def __init__(self, store: AtomicLocalStore, group: str, fields: list[str],
                 segments: list[Segment], *, progress: Any = None, workers: int = 2,
                 on_piece: Callable[[], None] | None = None, checksums: bool = True) -> None:
        self.checksums = bool(checksums)
        self.copied: list[Path] = []
        self.store = store
        self.group = group
        self.fields = list(fields)
        self.segments = segments
        self.workers = max(1, int(workers))
        self.on_piece = on_piece
        self.progress = progress  # a tools.Progress (thread-safe) or None
        self.metas: dict[str, dict] = {}
        self.lays: dict[str, ShardLayout | None] = {}
        self.unit_rows = self.rows = 0
        if not self.fields or not segments:
            return
        for f in self.fields:
            try:
                self.lays[f], self.metas[f] = ShardLayout.of(
                    segments[0].data_root / segments[0].group / f)
            except FileNotFoundError:
                raise DamageError(f"{segments[0].place}/{f}: array missing") from None
            except (OSError, ValueError) as exc:
                raise DamageError(f"{segments[0].place}/{f}/zarr.json: cannot be read ({exc})") \
                    from exc
        unit = {_unit_rows(m) for m in self.metas.values()}
        if len(unit) != 1:
            raise DamageError(f"{segments[0].place}: atom arrays differ in chunking "
                              f"({sorted(unit)})")
        self.unit_rows = unit.pop()
        self.rows = plan_starts(segments, self.unit_rows)

    def run(self) -> list[str]:
        """Copy every segment; returns crc32 mismatches. Damage that stops a read (a missing,
        truncated or undecodable file) raises :class:`DamageError` naming the file."""
        if not self.fields or not self.segments:
            return []
        outs = {}
        for f in self.fields:
            trailing = tuple(int(d) for d in self.metas[f]["shape"][1:])
            # the source's layout (its files are copied), this format's names and units (a
            # group of an older run may have none)
            meta = with_names({**self.metas[f], "shape": [self.rows, *trailing]},
                              array_dims(f, "atom", trailing), array_attributes(f))
            self.store.put_bytes(f"{self.group}/{f}/zarr.json", json.dumps(meta, indent=2).encode())
            outs[f] = _LazyArray(self.store, f"{self.group}/{f}")

        def one(f: str, seg: Segment) -> str | None:
            where = f"{seg.place}/{f}"
            try:
                src_lay, src_meta = ShardLayout.of(seg.data_root / seg.group / f)
            except FileNotFoundError:
                raise DamageError(f"{where}: array missing") from None
            except (OSError, ValueError) as exc:
                raise DamageError(f"{where}/zarr.json: cannot be read ({exc})") from exc
            if int(src_meta["shape"][0]) < seg.atoms:
                raise DamageError(f"{where}: shape has {src_meta['shape'][0]} rows, committed "
                                  f"{seg.atoms}")
            lay = self.lays[f]
            if lay is not None and src_lay is not None and src_lay.signature == lay.signature:
                args = (f, seg, seg.data_root / seg.group / f, int(src_meta["shape"][0]), lay,
                        Path(self.store.root) / self.group / f, outs[f], self.progress,
                        self.on_piece, self.checksums, self.copied)
                listed = {k.partition("/")[2]: v for k, v in seg.files.items()
                          if k.partition("/")[0] == f}
                try:
                    crc = _copy_raw(*args, listed=listed if self.checksums else {})
                except _Unlisted:
                    crc = _copy_raw(*args, listed={})  # check every row the slow way
                seg.checked[f] = ("rows" if crc is not None else
                                  "files" if self.checksums else "index")
            else:
                crc = _copy_zarr(f, seg, outs[f], self.unit_rows, self.progress)
                seg.checked[f] = "rows"
            want = seg.expect_crc.get(f)
            if want is not None and crc is not None and crc != int(want):
                return f"{where}: crc32 mismatch over atom rows [0, {seg.atoms})"
            return None

        jobs = [(f, s) for s in self.segments for f in self.fields]
        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="dist-hooks-segments") as pool:
            futures = [pool.submit(one, f, s) for f, s in jobs]
            try:
                problems = [p for fu in futures if (p := fu.result()) is not None]
            except BaseException:
                for fu in futures:
                    fu.cancel()
                raise
        # files copied past the store were synced as they were written (so the disk writes
        # overlap the copying: one sync at the end measured a third of the copy's time);
        # their directories here (zarr's writes: by the store's sync())
        fsync_tree({p.parent for p in self.copied}, stop_at=self.store.root)
        return problems


class _LazyArray:
    """An output array as zarr sees it, opened on the first write through it: most segments
    are copied as files and never need it (opening costs ~1 ms of zarr's metadata work)."""

    def __init__(self, store: AtomicLocalStore, path: str) -> None:
        self._store, self._path = store, path
        self._arr: Any = None
        self._lock = threading.Lock()

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            if self._arr is None:
                self._arr = zarr.open_array(self._store, path=self._path, mode="r+")
        # segments start on shard boundaries: threads writing here never share a shard
        self._arr[key] = value


class _Unlisted(Exception):
    """A shard file differs from its checksum in the commit records (or has none)."""


def _copy_raw(f: str, seg: Segment, src_dir: Path, src_rows: int, lay: ShardLayout,
              out_dir: Path, out: Any, progress: Any, on_piece: Callable[[], None] | None,
              checksums: bool, copied: list[Path], *,
              listed: dict[str, tuple[int, int]]) -> int | None:
    """Committed shards copied as files; returns the crc32 of the committed rows, or ``None``
    when the rows were not decoded: without ``checksums`` (then only each shard's index is read
    and checked), or when every shard file matched its ``listed`` ``(bytes, crc32)``, the
    checksum the writer took of it (then each file is checked whole at crc32 speed; a file
    that does not match raises :class:`_Unlisted` and the caller checks the rows instead).

    The last, partial shard is copied too when the source array ends where the commit does
    (``src_rows == seg.atoms``: a run that stopped at a boundary); otherwise it holds rows
    written after the last boundary, and only its committed rows are decoded and written
    again, through zarr, so that nothing uncommitted reaches the output.
    """
    S = lay.shard_rows
    n_shards = -(-seg.atoms // S)
    first = seg.start // S
    if listed and all(lay.shard_key(i) in listed for i in range(n_shards)) and (
            seg.atoms % S == 0 or src_rows == seg.atoms):
        return _copy_listed(f, seg, src_dir, lay, out_dir, progress, on_piece, copied, listed)
    crc: int | None = 0 if checksums else None
    for i in range(n_shards):
        key = lay.shard_key(i)
        src = src_dir / key
        where = f"{seg.place}/{f}/{key}"
        rows = min(S, seg.atoms - i * S)
        as_file = rows == S or src_rows == seg.atoms
        kept, data = None, None
        try:
            if as_file and not checksums:
                present = lay.read_index(src, where) is not None
            else:
                try:
                    data = src.read_bytes()
                except FileNotFoundError:
                    data = b""  # all fill value (zarr writes no such shard); crc32 tells a lost one
                present = bool(data)
                c, kept = read_shard_rows(data, lay, rows, where, crc or 0, keep=not as_file)
                crc = c if checksums else None
        except ShardDamage as exc:
            raise DamageError(str(exc)) from exc
        if not as_file:
            a = seg.start + i * S
            out[a: a + rows] = kept
        elif present:
            dst = out_dir / lay.shard_key(first + i)
            if data is not None:
                dst.write_bytes(data)  # exactly the bytes checked above
            else:
                shutil.copyfile(src, dst)  # the kernel copies (sendfile), as a file copy would
            fsync_file(dst)
            copied.append(dst)
        if progress is not None:
            progress.update(rows * lay.row_bytes)
        if on_piece is not None:
            on_piece()
    return crc


def _copy_listed(f: str, seg: Segment, src_dir: Path, lay: ShardLayout, out_dir: Path,
                 progress: Any, on_piece: Callable[[], None] | None, copied: list[Path],
                 listed: dict[str, tuple[int, int]]) -> None:
    """Every committed shard file of a segment, each checked whole against the checksum its
    writer took (see :meth:`~dist_hooks.store.group_writer.GroupWriter.take_file_checksums`)."""
    S = lay.shard_rows
    first = seg.start // S
    for i in range(-(-seg.atoms // S)):
        key = lay.shard_key(i)
        size, want = listed[key]  # (progress is counted once all match: a retry counts again)
        try:
            fd = os.open(src_dir / key, os.O_RDONLY)
        except FileNotFoundError:
            raise _Unlisted(key) from None
        try:
            # one descriptor for the check and the copy: the bytes copied are the bytes checked,
            # even if a writer replaces the file meanwhile
            try:
                ok = os.fstat(fd).st_size == size and fd_crc32(fd, size) == want
            except ValueError:  # truncated since the fstat
                ok = False
            if not ok:
                raise _Unlisted(key)
            dst = out_dir / lay.shard_key(first + i)
            _copy_fd(fd, dst, size)
        finally:
            os.close(fd)
        copied.append(dst)
        if on_piece is not None:
            on_piece()
    if progress is not None:
        progress.update(seg.atoms * lay.row_bytes)
    return None


def _copy_fd(fd: int, dst: Path, size: int) -> None:
    """``size`` bytes from ``fd`` into a new file ``dst``, in the kernel where it can; the
    new file is synced to disk before returning."""
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        try:
            while off < size:
                n = os.copy_file_range(fd, out, size - off, off, off)
                if n == 0:
                    break
                off += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        while off < size:  # no copy_file_range here: through user space
            chunk = os.pread(fd, min(size - off, 1 << 24), off)
            if not chunk:
                raise OSError(errno.EIO, f"{dst}: source ended at byte {off} of {size}")
            off += _write_all(out, chunk)
        os.fsync(out)
    finally:
        os.close(out)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def _copy_zarr(f: str, seg: Segment, out: Any, unit_rows: int, progress: Any) -> int:
    """The fallback for a source laid out unlike the output: decode, check, re-encode."""
    try:
        src = zarr.open_array(AtomicLocalStore(seg.data_root, read_only=True),
                              path=f"{seg.group}/{f}", mode="r")
    except Exception as exc:  # noqa: BLE001
        raise DamageError(f"{seg.place}/{f}: cannot be opened ({type(exc).__name__}: {exc})") \
            from exc
    crc = 0
    for a in range(0, seg.atoms, unit_rows):
        b = min(a + unit_rows, seg.atoms)
        try:
            rows = np.ascontiguousarray(src[a:b])
        except Exception as exc:  # noqa: BLE001 - any decode error is damage here
            raise DamageError(f"{seg.place}/{f}: rows [{a}, {b}) cannot be read "
                              f"({type(exc).__name__}: {exc})") from exc
        crc = zlib.crc32(rows, crc) if rows.size else crc
        out[seg.start + a: seg.start + b] = rows
        if progress is not None:
            progress.update(rows.nbytes)
    return crc

"""``dist-hooks export``: recorded structures to files ASE reads (extxyz, ASE database, ASE
trajectory).

Why ASE formats: they are what the rest of the atomistic toolchain (ASE itself, pymatgen,
OVITO, most MLIP training pipelines) reads; each structure keeps its velocities, energy and
forces (as a single-point calculator) and its step, rank and sample id, so an exported structure
can be traced back to the run. The Atoms are :func:`dist_hooks.ase_frames.atoms_of`'s, the same
that :meth:`RunReader.frames <dist_hooks.reader.RunReader.frames>` returns; what each format
cannot hold as ASE data goes where ASE reads it back: extxyz ``atoms.info`` and per-atom arrays;
ASE database key-value pairs (scalars) and ``data`` (arrays, and scalars under reserved names);
trajectory ``atoms.info`` (extra atom fields too, as ASE trajectories keep no custom arrays).

Records stream in bounded blocks from the consolidated output when it is current, else from the
per-rank groups merged on the fly, in (step, rank, sample_id) order, selected (sample ids,
ranks, steps) block by block. The file appears atomically (temporary + rename) when complete.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..ase_frames import Selection, atoms_of, group_blocks, import_ase
from ..errors import RunError
from ..reader import RunReader, open_run
from ..records import CsrBlock, merge_blocks
from ..store import layout
from ..store.group_reader import GroupReader
from .mirror import naming_url
from .progress import Progress
from .record_source import ZarrSource

__all__ = ["FORMATS", "export", "iter_blocks"]

#: ``--format`` -> the temporary file's suffix (ASE picks some backends by name).
FORMATS = {"extxyz": ".xyz", "ase-db": ".db", "traj": ".traj"}
#: Arrays every Atoms has of its own; the others are exported as extra atom fields.
_ASE_ARRAYS = ("numbers", "positions", "masses", "momenta")


def iter_blocks(run: RunReader, what: str, hook: str | None = None, *,
                ranks: Iterable[int] | None = None, block_records: int = 4096,
                block_atoms: int = 65536) -> tuple[int, Iterator[CsrBlock]]:
    """The number of records of ``what`` ("converged" or "trajectory") and those records as
    bounded :class:`~dist_hooks.records.CsrBlock` s in (step, rank, sample_id) order, committed
    records only. ``ranks``: when given, only these ranks' groups are read (and counted) where
    each rank has its own; the caller still selects by rank where they are merged already."""
    kw = {"block_records": block_records, "block_atoms": block_atoms}
    if what == "converged":
        if run.consolidated is not None and (run.summary or {}).get("converged"):
            c = run.summary["converged"]
            root = run.consolidated / layout.DATA_DIR
            return c["records"], iter(ZarrSource(root, c["group"], place=str(root / c["group"]),
                                                 records=c["records"], atoms=c["atoms"], **kw))
        if run.path is None:
            raise RunError("the consolidated output holds no converged records")
        run.require_consistent("export from")
        merged = run.manifest.merged
        return merged.records, iter(ZarrSource(
            run.path / layout.DATA_DIR, layout.CONVERGED_GROUP,
            place=f"{layout.DATA_DIR}/{layout.CONVERGED_GROUP}", records=merged.records,
            atoms=merged.atoms, **kw))
    if what != "trajectory":
        raise RunError(f"--what must be 'converged' or 'trajectory', got {what!r}")
    hook = run.snapshot_hook(hook)
    info = (run.summary or {}).get("hooks", {}).get(hook) if run.consolidated else None
    if info is not None:
        reader = GroupReader(run.consolidated / layout.DATA_DIR, info["group"],
                             limit_records=info["records"])
        return len(reader), group_blocks(reader, block_records)
    if run.path is None:
        raise RunError(f"the consolidated output holds no group for hook {hook!r}")
    run.require_consistent("export from")
    units = [u for u in run.units if u.kind == "zarr" and u.hook == hook
             and (ranks is None or u.rank in set(ranks))]
    total = sum(u.records for u in units)
    sources = []
    for u in units:
        root = run.root_of(u.rank, "export of an unconsolidated trajectory")
        u.path(root)
        sources.append((u.rank, ZarrSource(root / layout.DATA_DIR, u.group, place=u.rel,
                                           records=u.records, atoms=u.atoms, **kw)))
    return total, merge_blocks(sources)


def export(run_dir: str | os.PathLike, *, what: str, fmt: str, out: str | os.PathLike,
           hook: str | None = None, rank_roots: Sequence[str | os.PathLike] = (),
           sample_ids: Iterable[int] | int | None = None, ranks: Iterable[int] | int | None = None,
           steps: Any = None, progress: bool | None = None,
           cache: str | os.PathLike | None = None,
           storage_options: dict[str, Any] | None = None) -> dict:
    """Write ``what`` of a run to ``out`` as ``fmt`` ("extxyz", "ase-db" or "traj"); returns
    ``{"structures", "out", "what", "format"}``. Only the records of ``sample_ids``, ``ranks``
    and ``steps`` (``"A:B"``: A <= step < B) when given. ``progress``: a bar on stderr (``None``:
    when stderr is a terminal). ``rank_roots``, ``cache``, ``storage_options`` (an ``s3://``
    run): as for :func:`~dist_hooks.reader.open_run`."""
    import_ase()
    if fmt not in FORMATS:
        raise RunError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    sel = Selection.of(sample_ids, ranks, steps)
    run = open_run(run_dir, rank_roots, storage_options=storage_options, cache=cache)
    with naming_url(run.mirror):
        return _export(run, what, fmt, Path(out), hook, sel, progress)


def _export(run: RunReader, what: str, fmt: str, out: Path, hook: str | None, sel: Selection,
            progress: bool | None) -> dict:
    total, blocks = iter_blocks(run, what, hook, ranks=sel.ranks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}{FORMATS[fmt]}"
    bar = Progress(total, f"export {what}", enabled=progress)
    count = 0
    try:
        with _writer(fmt, tmp) as write:
            for block in blocks:
                chosen = sel.apply(block)
                if len(chosen):
                    structures = atoms_of(chosen)
                    write(structures)
                    count += len(structures)
                bar.update(len(block))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"structures": count, "out": str(out), "what": what, "format": fmt}


@contextlib.contextmanager
def _writer(fmt: str, path: Path) -> Iterator[Callable[[list[Any]], Any]]:
    """The open output of one format, as ``write(list of Atoms)``; closed on leaving."""
    if fmt == "extxyz":
        import ase.io  # the optional dependency, imported where used (import_ase checked it)
        with open(path, "w") as fh:
            yield lambda images: ase.io.write(fh, images, format="extxyz")
    elif fmt == "traj":
        from ase.io.trajectory import Trajectory
        with Trajectory(str(path), "w") as traj:
            yield lambda images: [traj.write(_traj_ready(a)) for a in images]
    else:
        import ase.db
        with ase.db.connect(str(path), type="db", append=False) as db:  # one transaction
            yield lambda images: [_db_write(db, a) for a in images]


def _extra_arrays(atoms: Any) -> dict[str, np.ndarray]:
    """The per-atom arrays :func:`atoms_of` added for atom fields beyond the structure."""
    return {k: v for k, v in atoms.arrays.items() if k not in _ASE_ARRAYS}


def _traj_ready(atoms: Any) -> Any:
    """An ASE trajectory keeps no custom per-atom arrays: they go to ``info`` (which it keeps)."""
    extra = _extra_arrays(atoms)
    for k, v in extra.items():
        del atoms.arrays[k]
        atoms.info[k] = v
    return atoms


def _db_write(db: Any, atoms: Any) -> None:
    """One row: scalars of ``info`` as key-value pairs (searchable), arrays, scalars under a
    name ASE reserves, and extra atom fields under ``data``."""
    from ase.db.core import reserved_keys, word

    kv: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for k, v in atoms.info.items():
        ok = (isinstance(v, (numbers.Real, str)) and word.match(k) and k not in reserved_keys)
        (kv if ok else data)[k] = v
    for k, v in _extra_arrays(atoms).items():
        data[k] = v
        del atoms.arrays[k]
    db.write(atoms, key_value_pairs=kv, data=data)

"""``dist-hooks export``: recorded structures to files ASE reads (extxyz, ASE database).

Why ASE formats: they are what the rest of the atomistic toolchain (ASE itself, pymatgen,
OVITO, most MLIP training pipelines) reads; each structure keeps its energy and forces (as a
single-point calculator) and its step, rank and sample id (``atoms.info`` in extxyz, key-value
pairs in the database), so an exported structure can be traced back to the run.

Records stream in bounded blocks from the consolidated output when it is current, else from the
per-rank groups merged on the fly, in (step, rank, sample_id) order. Building one ``ase.Atoms``
per record is a Python loop by nature; the merge itself is not. The file appears atomically
(temporary + rename) when complete.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import MissingDependencyError, RunError
from ..reader import RunReader, open_run
from ..records import CsrBlock, merge_blocks
from ..store import layout
from ..store.group_reader import GroupReader
from .record_source import ZarrSource

__all__ = ["export", "iter_blocks"]

#: Record fields that become part of the Atoms object itself rather than ``info``.
_STRUCT_RECORD = ("cell", "pbc", "energy")
_STRUCT_ATOM = ("positions", "atomic_numbers", "atomic_masses", "forces")
#: Carried under every format (extxyz info keys / ase-db key-value pairs).
IDENTITY = ("step", "rank", "sample_id", "graph_idx", "status")


def iter_blocks(run: RunReader, what: str, hook: str | None = None, *,
                block_records: int = 4096, block_atoms: int = 65536) -> Iterator[CsrBlock]:
    """Bounded :class:`~dist_hooks.records.CsrBlock` s of ``what`` ("converged" or
    "trajectory") in (step, rank, sample_id) order, committed records only."""
    kw = {"block_records": block_records, "block_atoms": block_atoms}
    if what == "converged":
        if run.consolidated is not None and (run.summary or {}).get("converged"):
            c = run.summary["converged"]
            root = run.consolidated / layout.DATA_DIR
            return iter(ZarrSource(root, c["group"], place=str(root / c["group"]),
                                   records=c["records"], atoms=c["atoms"], **kw))
        if run.path is None:
            raise RunError("the consolidated output holds no converged records")
        run.require_consistent("export from")
        merged = run.manifest.merged
        return iter(ZarrSource(run.path / layout.DATA_DIR, layout.CONVERGED_GROUP,
                               place=f"{layout.DATA_DIR}/{layout.CONVERGED_GROUP}",
                               records=merged.records, atoms=merged.atoms, **kw))
    if what != "trajectory":
        raise RunError(f"--what must be 'converged' or 'trajectory', got {what!r}")
    hooks = sorted({u.hook for u in run.units if u.kind == "zarr" and not u.converged})
    if hook is None:
        if len(hooks) != 1:
            raise RunError(f"the run has snapshot hooks {hooks}; choose one with --hook")
        hook = hooks[0]
    elif hook not in hooks:
        raise RunError(f"no snapshot hook {hook!r}; the run has {hooks}")
    info = (run.summary or {}).get("hooks", {}).get(hook) if run.consolidated else None
    if info is not None:
        return _reader_blocks(GroupReader(run.consolidated / layout.DATA_DIR, info["group"],
                                          limit_records=info["records"]), block_records)
    if run.path is None:
        raise RunError(f"the consolidated output holds no group for hook {hook!r}")
    run.require_consistent("export from")
    units = [u for u in run.units if u.kind == "zarr" and u.hook == hook]
    sources = []
    for u in units:
        root = run.root_of(u.rank, "export of an unconsolidated trajectory")
        u.path(root)
        sources.append((u.rank, ZarrSource(root / layout.DATA_DIR, u.group, place=u.rel,
                                           records=u.records, atoms=u.atoms, **kw)))
    return merge_blocks(sources)


def _reader_blocks(reader: GroupReader, block_records: int) -> Iterator[CsrBlock]:
    """Bounded blocks through the reader, which also reads a consolidated trajectory's indexed
    layout (atom rows as per-rank segments) in record order."""
    for a in range(0, len(reader), max(block_records, 1)):
        d = reader.records(a, a + block_records)
        ptr = np.asarray(d.pop(layout.ATOMS_PTR), dtype=np.int64)
        yield CsrBlock({n: v for n, v in d.items() if reader.fields[n][0] == "record"},
                       {n: v for n, v in d.items() if reader.fields[n][0] == "atom"}, ptr)


def _atoms_of(block: CsrBlock, ase: Any) -> list[Any]:
    from ase.calculators.singlepoint import SinglePointCalculator

    ptr = block.ptr
    rec, at = block.rec, block.atoms
    if "positions" not in at or "atomic_numbers" not in at:
        raise RunError("records lack positions or atomic_numbers; nothing ASE could read")
    pos = np.asarray(at["positions"], dtype=np.float64)
    forces = np.asarray(at["forces"], dtype=np.float64) if "forces" in at else None
    extra_atom = [n for n in at if n not in _STRUCT_ATOM]
    scalars = [n for n in rec if n not in _STRUCT_RECORD and np.ndim(rec[n]) == 1]
    out = []
    for i in range(len(block)):  # one Atoms object per record: inherent to the output format
        a, b = int(ptr[i]), int(ptr[i + 1])
        atoms = ase.Atoms(numbers=np.asarray(at["atomic_numbers"][a:b]).reshape(-1),
                          positions=pos[a:b])
        if "cell" in rec:
            atoms.set_cell(np.asarray(rec["cell"][i], dtype=np.float64).reshape(3, 3))
        if "pbc" in rec:
            atoms.set_pbc(np.asarray(rec["pbc"][i]).reshape(-1).astype(bool))
        if "atomic_masses" in at:
            atoms.set_masses(np.asarray(at["atomic_masses"][a:b], dtype=np.float64).reshape(-1))
        for n in extra_atom:
            atoms.new_array(n, np.asarray(at[n][a:b]))
        for n in scalars:
            v = rec[n][i]
            atoms.info[n] = v.item() if hasattr(v, "item") else v
        energy = float(np.asarray(rec["energy"][i]).reshape(-1)[0]) if "energy" in rec else None
        atoms.calc = SinglePointCalculator(atoms, energy=energy,
                                           forces=None if forces is None else forces[a:b])
        out.append(atoms)
    return out


def export(run_dir: str | os.PathLike, *, what: str, fmt: str, out: str | os.PathLike,
           hook: str | None = None, rank_roots: Sequence[str | os.PathLike] = ()) -> dict:
    """Write ``what`` of a run to ``out`` as ``fmt`` ("extxyz" or "ase-db"); returns
    ``{"structures", "out"}``. ``rank_roots``: as for :func:`~dist_hooks.reader.open_run`."""
    try:
        import ase
        import ase.io
    except ImportError:
        raise MissingDependencyError("export needs ASE: pip install 'dist_hooks[ase]' "
                                     "(or pip install ase)") from None
    if fmt not in ("extxyz", "ase-db"):
        raise RunError(f"--format must be 'extxyz' or 'ase-db', got {fmt!r}")
    run = open_run(run_dir, rank_roots)
    blocks = iter_blocks(run, what, hook)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".db" if fmt == "ase-db" else ".xyz"
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}{suffix}"
    count = 0
    try:
        if fmt == "extxyz":
            with open(tmp, "w") as fh:
                for block in blocks:
                    structures = _atoms_of(block, ase)
                    ase.io.write(fh, structures, format="extxyz")
                    count += len(structures)
        else:
            import ase.db
            db = ase.db.connect(str(tmp), type="db", append=False)
            with db:
                for block in blocks:
                    for atoms in _atoms_of(block, ase):
                        kv = {k: atoms.info[k] for k in IDENTITY if k in atoms.info}
                        data = {k: v for k, v in atoms.info.items() if k not in kv}
                        db.write(atoms, key_value_pairs=kv, data=data)
                        count += 1
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"structures": count, "out": str(out), "what": what, "format": fmt}

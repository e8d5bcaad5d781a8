"""Recorded systems as ``ase.Atoms``: the one conversion, and which records to convert.

Why one module: ``dist-hooks export`` (extxyz, ASE database, ASE trajectory) and
:meth:`RunReader.frames <dist_hooks.reader.RunReader.frames>` must give the same Atoms for the
same record, so that a structure read back from any export equals the one read in Python.

Units. dist_hooks records what the engine holds, in nvalchemi's units (docs: seed API): Å, eV,
amu, and velocities in sqrt(eV/amu), i.e. Å per internal time unit Å·sqrt(amu/eV). That time unit
is ASE's own (``ase.units.fs`` = 0.0982269..., the demo's ``FS``), so ASE's velocity unit is the
same and velocities go to :meth:`ase.Atoms.set_velocities` unscaled (ASE stores momenta
= masses × velocities). ``atoms.get_temperature()`` then equals the LoggingHook's temperature,
both being 2 KE / (3 N k_B) without a centre-of-mass correction (the Atoms carry no constraints),
up to k_B: ASE uses CODATA 2014 (8.6173303e-5 eV/K), the hook CODATA 2018 (8.617333262e-5), so
ASE's temperature is larger by 3.4e-7 (relative).

Building one ``Atoms`` per record is a Python loop by nature (the output is one object per
system); the reading and the selection are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import MissingDependencyError, RunError
from .records import CsrBlock
from .store import layout
from .store.group_reader import GroupReader

__all__ = ["STRUCT_ATOM", "STRUCT_RECORD", "Selection", "atoms_of", "group_blocks",
           "group_frames", "import_ase", "parse_steps"]

#: Record fields that become part of the Atoms object itself rather than ``info``.
STRUCT_RECORD = ("cell", "pbc", "energy")
#: Atom fields that become part of the Atoms object (arrays, momenta, calculator).
STRUCT_ATOM = ("positions", "atomic_numbers", "atomic_masses", "velocities", "forces")


def import_ase() -> ModuleType:
    """``ase`` with its single-point calculator, or :class:`MissingDependencyError` (ASE is an
    optional dependency: the ``ase`` extra)."""
    try:
        import ase
        import ase.calculators.singlepoint  # noqa: F401  (used as ase.calculators.singlepoint)
    except ImportError:
        raise MissingDependencyError("ASE is needed here: pip install 'dist_hooks[ase]' "
                                     "(or pip install ase)") from None
    return ase


def parse_steps(steps: Any) -> tuple[int | None, int | None] | None:
    """``A:B`` (a string, either end may be left out), a ``slice`` or an ``(A, B)`` pair as the
    bounds ``A <= step < B`` (as a Python slice); ``None`` for all steps. :class:`RunError`
    (a usage error) for anything else."""
    if steps is None:
        return None
    try:
        if isinstance(steps, str):
            a, sep, b = steps.partition(":")
            if not sep:
                raise ValueError
            bounds = (int(a) if a.strip() else None, int(b) if b.strip() else None)
        elif isinstance(steps, slice):
            if steps.step not in (None, 1):
                raise ValueError
            bounds = (steps.start, steps.stop)
        else:
            a, b = steps
            bounds = (a, b)
        return tuple(None if v is None else int(v) for v in bounds)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise RunError(f"steps must be A:B (A <= step < B; either end may be left out), "
                       f"got {steps!r}") from None


@dataclass(frozen=True)
class Selection:
    """Which records: sample ids, ranks, and a step range ``[start, stop)``; ``None`` is all."""

    sample_ids: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    steps: tuple[int | None, int | None] | None = None

    @classmethod
    def of(cls, sample_ids: Iterable[int] | int | None = None,
           ranks: Iterable[int] | int | None = None, steps: Any = None) -> "Selection":
        """From what a caller passes: one int or several, and steps as :func:`parse_steps`."""
        def ints(v: Iterable[int] | int | None) -> tuple[int, ...] | None:
            if v is None:
                return None
            return (int(v),) if isinstance(v, (int, np.integer)) else tuple(int(x) for x in v)
        return cls(ints(sample_ids), ints(ranks), parse_steps(steps))

    @property
    def everything(self) -> bool:
        return self.sample_ids is None and self.ranks is None and self.steps is None

    def mask(self, rec: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Boolean mask over the ``n`` records of the record columns ``rec`` (which hold the
        ``step``, ``sample_id`` and, when ranks are selected, ``rank`` columns)."""
        keep = np.ones(n, dtype=bool)
        if self.sample_ids is not None:
            keep &= np.isin(rec["sample_id"], self.sample_ids)
        if self.ranks is not None:
            keep &= np.isin(rec["rank"], self.ranks)
        if self.steps is not None:
            a, b = self.steps
            if a is not None:
                keep &= rec["step"] >= a
            if b is not None:
                keep &= rec["step"] < b
        return keep

    def apply(self, block: CsrBlock) -> CsrBlock:
        """The selected records of ``block``, with their atom rows."""
        if self.everything:
            return block
        return block.take(np.flatnonzero(self.mask(block.rec, len(block))))


def group_blocks(reader: GroupReader, block_records: int = 4096,
                 idx: np.ndarray | None = None) -> Iterator[CsrBlock]:
    """A group's records as bounded blocks through the reader (which also reads a consolidated
    trajectory's indexed layout in record order); with ``idx`` (sorted record indices), only
    those records, read window by window (a window without one is not read)."""
    step = max(int(block_records), 1)
    n = len(reader)
    for a in range(0, n, step):
        b = min(a + step, n)
        if idx is not None:
            lo, hi = np.searchsorted(idx, [a, b])
            if lo == hi:
                continue
        d = reader.records(a, b)
        block = CsrBlock.from_columns(d, {k: reader.fields[k][0] for k in d if k != layout.ATOMS_PTR})
        yield block if idx is None else block.take(idx[lo:hi] - a)


def group_frames(groups: list[tuple[GroupReader, int | None]], sel: Selection,
                 what: str) -> list[Any]:
    """The selected records of ``groups`` as Atoms. Each group comes with its rank, or ``None``
    when it has a ``rank`` column (a consolidated trajectory). ``sel`` must name one sample id;
    records of it found on more than one rank are refused (sample ids are a rank's own), naming
    the ranks, unless ``sel.ranks`` picks one."""
    picked: list[tuple[GroupReader, int | None, np.ndarray]] = []
    found: set[int] = set()
    for g, rank in groups:
        rec = {k: g.column(k) for k in ("step", "sample_id", "rank") if k in g.fields}
        if rank is not None:
            rec["rank"] = np.full(len(g), rank, dtype=np.int64)
        idx = np.flatnonzero(sel.mask(rec, len(g)))
        if len(idx):
            picked.append((g, rank, idx))
            found.update(np.unique(rec["rank"][idx]).tolist())
    if len(found) > 1:
        ids = ", ".join(map(str, sel.sample_ids or ()))
        raise RunError(f"{what}: sample id {ids} is on ranks {sorted(found)}; choose one "
                       f"with rank=")
    out: list[Any] = []
    for g, rank, idx in picked:
        for block in group_blocks(g, idx=idx):
            if rank is not None:
                block.rec["rank"] = np.full(len(block), rank, dtype=np.int64)
            out.extend(atoms_of(block))
    return out


def atoms_of(block: CsrBlock) -> list[Any]:
    """One ``ase.Atoms`` per record of ``block``: numbers, positions, cell, pbc, masses,
    velocities (as momenta), energy and forces on a ``SinglePointCalculator``; the other scalar
    and array record fields in ``atoms.info``, the other atom fields as per-atom arrays
    (``atoms.new_array``). Values are the recorded ones, widened to float64."""
    ase = import_ase()
    spc = ase.calculators.singlepoint.SinglePointCalculator
    ptr = block.ptr
    rec, at = block.rec, block.atoms
    if "positions" not in at or "atomic_numbers" not in at:
        raise RunError("records lack positions or atomic_numbers; nothing ASE could read")

    def f64(name: str) -> np.ndarray | None:
        return np.asarray(at[name], dtype=np.float64) if name in at else None

    pos, forces, vel = f64("positions"), f64("forces"), f64("velocities")
    masses = f64("atomic_masses")
    numbers = np.asarray(at["atomic_numbers"]).reshape(-1)
    extra_atom = [n for n in at if n not in STRUCT_ATOM]
    extra_rec = [n for n in rec if n not in STRUCT_RECORD]
    out = []
    for i in range(len(block)):  # one Atoms object per record: inherent to the output format
        a, b = int(ptr[i]), int(ptr[i + 1])
        atoms = ase.Atoms(numbers=numbers[a:b], positions=pos[a:b])
        if "cell" in rec:
            atoms.set_cell(np.asarray(rec["cell"][i], dtype=np.float64).reshape(3, 3))
        if "pbc" in rec:
            atoms.set_pbc(np.asarray(rec["pbc"][i]).reshape(-1).astype(bool))
        if masses is not None:  # before the velocities: ASE keeps momenta = masses * velocities
            atoms.set_masses(masses[a:b].reshape(-1))
        if vel is not None:
            atoms.set_velocities(vel[a:b])
        for n in extra_atom:
            atoms.new_array(n, np.asarray(at[n][a:b]))
        for n in extra_rec:
            v = np.asarray(rec[n][i])
            atoms.info[n] = v.item() if v.ndim == 0 else v
        energy = float(np.asarray(rec["energy"][i]).reshape(-1)[0]) if "energy" in rec else None
        atoms.calc = spc(atoms, energy=energy, forces=None if forces is None else forces[a:b])
        out.append(atoms)
    return out

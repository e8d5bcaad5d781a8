"""Names and the format version of a run directory, kept in one place.

Every module that reads or writes a run (writers, coordinator, reader, CLI) takes its paths from
here, so that the on-disk layout (docs/format.md) can only change in one file, together with
``FORMAT_VERSION``.

    RUN/run.json                          manifest (MANIFEST)
    RUN/logs/<hook>/rank-00000.csv        per-rank CSV logs (csv_path)
    RUN/data.zarr/ranks/rank-00000/<hook> per-rank, per-hook Zarr group (hook_group)
    RUN/data.zarr/converged               coordinator-merged converged records (CONVERGED_GROUP)
    RUN/boundaries/b-000003.json          one committed boundary (boundary_file)
    RUN/state/rank-00000/b-000003.pt      a rank's saved simulation state (state_file)

The same rules check every name and path read back from a run's own files (``run.json``, the
boundary files, ``consolidated.json``): :func:`name_problem` for names that become path
components, :func:`relative_path_problem` for paths, so that a damaged or hand-edited file can
name nothing a writer would not have written (docs/format.md, "Names and paths").

The names of the record-group arrays' dimensions and their units (:func:`array_dims`,
:func:`array_attributes`) are kept here too: one table every array writer takes them from.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT_NAME = "dist_hooks"
#: Bump when a reader of the previous version could misread a new run.
FORMAT_VERSION = 1

DATA_DIR = "data.zarr"
LOGS_DIR = "logs"
MANIFEST = "run.json"
RANKS_GROUP = "ranks"
CONVERGED_GROUP = "converged"
#: CSR offsets array in every record group: record r owns atom rows atoms_ptr[r]:atoms_ptr[r+1].
ATOMS_PTR = "atoms_ptr"
#: The indexed layout of a consolidated trajectory (no atoms_ptr): record r owns atom rows
#: atoms_start[r]:atoms_start[r]+n_atoms[r]; group attribute ``atoms_layout`` is INDEXED.
ATOMS_START = "atoms_start"
N_ATOMS = "n_atoms"
INDEXED = "indexed"
#: The key columns the snapshot hooks write into every record of a record group themselves.
RECORD_KEYS = ("step", "sample_id", "graph_idx", "status")
#: The record column the merged group and the consolidated output add: the rank that wrote it.
RANK_COLUMN = "rank"
#: Names the format gives its own columns (the record keys, ``rank``, the CSR and indexed layout
#: arrays; the CSV's integer columns are among them): no recorded batch field and no custom scalar
#: may take one, since it would overwrite or shadow that column (docs/format.md).
RESERVED_NAMES = frozenset(RECORD_KEYS + (RANK_COLUMN, ATOMS_PTR, ATOMS_START, N_ATOMS))

BOUNDARIES_DIR = "boundaries"
STATE_DIR = "state"
RANK_PREFIX = "rank-"


def rank_name(rank: int) -> str:
    """``rank-00042``: zero-padded so that names sort in rank order."""
    return f"{RANK_PREFIX}{int(rank):05d}"


def rank_group(rank: int) -> str:
    """Zarr path of one rank's group, relative to the data root."""
    return f"{RANKS_GROUP}/{rank_name(rank)}"


def hook_group(rank: int, hook_name: str) -> str:
    """Zarr path of one hook's group on one rank: the unit with exactly one writing process."""
    _check_name(hook_name)
    return f"{rank_group(rank)}/{hook_name}"


def csv_path(run_dir: str | Path, hook_name: str, rank: int) -> Path:
    """Path of one rank's CSV log for one logging hook."""
    _check_name(hook_name)
    return Path(run_dir) / LOGS_DIR / hook_name / f"{rank_name(rank)}.csv"


def boundary_file(index: int) -> str:
    """Path of boundary ``index``'s file, relative to the run directory."""
    return f"{BOUNDARIES_DIR}/b-{int(index):06d}.json"


def state_dir(rank: int) -> str:
    """Folder of one rank's saved states, relative to its rank root."""
    return f"{STATE_DIR}/{rank_name(rank)}"


def state_file(rank: int, index: int) -> str:
    """Path of the state ``rank`` saved at boundary ``index``, relative to its rank root."""
    return f"{state_dir(rank)}/b-{int(index):06d}.pt"


# consolidate's output (OUT/): one group or log per hook, named by the hook
CONSOLIDATED_HOOKS_GROUP = "hooks"


def consolidated_group(hook_name: str) -> str:
    """Zarr path, inside ``OUT/data.zarr``, of a snapshot hook's consolidated trajectory."""
    _check_name(hook_name)
    return f"{CONSOLIDATED_HOOKS_GROUP}/{hook_name}"


def consolidated_log(hook_name: str, suffix: str = ".csv") -> str:
    """Path, inside ``OUT``, of a CSV log's merged copy (``suffix`` ".csv" or ".parquet")."""
    _check_name(hook_name)
    return f"{LOGS_DIR}/{hook_name}{suffix}"


def parse_rank_name(name: str) -> int | None:
    """Inverse of :func:`rank_name`; ``None`` for names that are not rank directories."""
    if not name.startswith(RANK_PREFIX):
        return None
    digits = name[len(RANK_PREFIX):]
    return int(digits) if digits.isdigit() else None


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a hook name, or ``None``. A hook name becomes a path component
    (``logs/<hook>/``, ``ranks/rank-N/<hook>``, consolidate's ``logs/<hook>.csv``): refuse what
    would escape or nest (a separator, ``..``, a hidden name, a NUL)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if ("/" in name or "\\" in name or "\0" in name or name in (".", "..")
            or name.startswith(".")):
        return "must be a single, non-hidden path component"
    return None


def _check_name(name: str) -> None:
    why = name_problem(name)
    if why is not None:
        raise ValueError(f"invalid hook name {name!r}: {why}")


def relative_path_problem(rel: object) -> str | None:
    """Why ``rel`` cannot be a path inside a run (or a rank root), or ``None``: it must be a
    ``/``-separated relative path of plain components (no ``..``, ``.``, empty or hidden
    component, no backslash or NUL). :func:`~dist_hooks.store.storage.run_path` still guards
    every use (it resolves symlinks); this refuses what no writer writes, before any use."""
    if not isinstance(rel, str) or not rel:
        return "must be a non-empty relative path"
    if rel.startswith("/") or "\\" in rel or "\0" in rel:
        return "must be a relative path"
    if any(not c or c.startswith(".") for c in rel.split("/")):
        return "must not hold '..', '.', empty or hidden components"
    return None


def group_attrs(levels: Mapping[str, str], extra: Mapping[str, Any] | None = None) -> dict:
    """The attributes of a record group: the format, each field's level ("record"/"atom"),
    then ``extra`` (hook name, frequency, ...) over them; what every group writer stores."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "level": dict(levels),
            **(extra or {})}


# ------------------------------------------------------------------------------------------------
# dimension names and units: what xarray (``dimension_names``) and unit-aware tools (pint-xarray,
# cf-xarray: the CF attribute ``units``) read of every record-group array (docs/format.md,
# "Dimension names and units"). One table, used by every writer of an array.
# ------------------------------------------------------------------------------------------------
#: Leading axis of record-level arrays (R rows) and of atom-level arrays (A rows, in the indexed
#: layout the N rows of the segments, padding included).
RECORD_DIM = "record"
ATOM_DIM = "atom"
#: Axis of ``atoms_ptr`` (R + 1 entries: the edges between the records' atom ranges). Its own
#: name: xarray requires one length per dimension name in a group.
RECORD_EDGE_DIM = "record_edge"
#: Cartesian components; the lattice vectors of ``cell`` (its rows; also ``pbc``'s axis: one flag
#: per lattice vector); a 3x3 Cartesian tensor's rows and columns (xarray refuses one name twice
#: in one array); a 6-vector in Voigt order.
XYZ_DIM = "xyz"
CELL_VECTOR_DIM = "cell_vector"
TENSOR_DIMS = ("xyz_row", "xyz_col")
VOIGT_DIM = "voigt"
#: Known fields' trailing axes, by trailing shape; any other shape gets generic names.
FIELD_TRAILING_DIMS: dict[str, dict[tuple[int, ...], tuple[str, ...]]] = {
    **{n: {(3,): (XYZ_DIM,)} for n in ("positions", "velocities", "forces", "dipole", "magmoms")},
    "cell": {(3, 3): (CELL_VECTOR_DIM, XYZ_DIM)},
    "pbc": {(3,): (CELL_VECTOR_DIM,)},
    **{n: {(3, 3): TENSOR_DIMS, (6,): (VOIGT_DIM,)} for n in ("stress", "virial")},
}
#: The CF attribute name of a variable's units.
UNITS_ATTR = "units"
#: Units of the known physical fields: nvalchemi's (and ASE's) units, the ones this package's own
#: reductions assume (the CSV's temperature takes masses in amu and velocities in sqrt(eV/amu)).
#: Spelled as pint parses them (``angstrom``, not ``Å``; ``^`` for powers). Ids,
#: counts, flags, atomic numbers and unknown fields carry none.
FIELD_UNITS: dict[str, str] = {
    "positions": "angstrom",
    "velocities": "(eV/amu)^0.5",
    "forces": "eV/angstrom",
    "atomic_masses": "amu",
    "charges": "e",
    "magmoms": "mu_B",
    "energy": "eV",
    "cell": "angstrom",
    "stress": "eV/angstrom^3",
    "virial": "eV",
    "dipole": "e*angstrom",
    "charge": "e",
    "temperature": "K",
}


def array_dims(name: str, level: str, trailing: tuple[int, ...]) -> tuple[str, ...]:
    """The ``dimension_names`` of array ``name`` at ``level`` ("record"/"atom") with trailing
    shape ``trailing``: the level's axis (``atoms_ptr``: its own), then the field's named axes,
    or ``<name>_dim1``, ``<name>_dim2``, ... (names no other array's axis takes, so that two
    unknown fields never claim one name with two lengths)."""
    trailing = tuple(int(d) for d in trailing)
    lead = (RECORD_EDGE_DIM if name == ATOMS_PTR else ATOM_DIM if level == "atom"
            else RECORD_DIM)
    named = FIELD_TRAILING_DIMS.get(name, {}).get(trailing)
    if named is None:
        named = tuple(f"{name}_dim{i}" for i in range(1, len(trailing) + 1))
    return (lead, *named)


def array_attributes(name: str) -> dict[str, str]:
    """The attributes of array ``name``: ``{"units": ...}`` for a known physical field, else
    none."""
    units = FIELD_UNITS.get(name)
    return {UNITS_ATTR: units} if units is not None else {}

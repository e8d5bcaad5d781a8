"""A read-only view of one simulation batch, as the recording hooks need it.

Why a view: engines hand us different batch objects (nvalchemi's ``Batch``, our demo batch, a user's
own container). The view finds the per-atom and per-system tensors by name, derives the CSR atom
offsets and a stable per-system identity, and does all of it without a host synchronisation: every
size it needs comes from tensor *shapes*, which the host already knows.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BatchError

# Fields we know the level of, so a batch where N_atoms == B (one atom per system) is not ambiguous.
ATOM_FIELDS = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses", "charges", "magmoms")
SYSTEM_FIELDS = ("energy", "cell", "pbc", "stress", "virial", "status", "system_id", "dipole", "charge")
# Pointer/index tensors and ephemeral neighbour data: never recorded as fields.
EXCLUDED = ("batch_ptr", "ptr", "batch_idx", "batch", "graph_idx")
EXCLUDED_PREFIXES = ("neighbor", "neighbour", "edge", "shift", "_")


def _get(batch: Any, name: str) -> Any:
    try:
        return getattr(batch, name)
    except Exception:  # some batch containers raise KeyError-like errors for absent keys
        return None


def _tensor_attributes(batch: Any) -> dict[str, torch.Tensor]:
    """All tensor attributes of a batch, whatever container it is (dataclass, tensordict, plain)."""
    names: list[str] = []
    keys = getattr(batch, "keys", None)
    if callable(keys):
        try:
            names.extend(str(k) for k in keys())
        except Exception:
            pass
    if hasattr(batch, "__dict__"):
        names.extend(vars(batch))
    names.extend(ATOM_FIELDS + SYSTEM_FIELDS)
    out: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(names):
        if name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES):
            continue
        value = _get(batch, name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out[name] = value
    return out


@dataclass
class BatchView:
    """Per-atom/per-system tensors of a batch plus the CSR offsets ``atoms_ptr`` and sample ids.

    ``num_systems`` and ``num_atoms`` are Python ints taken from shapes (no device sync).
    ``sample_id`` is the batch's ``system_id`` when it has one, else the batch position; either way
    the pair (rank, sample_id) is the identity recorded on disk.
    """

    batch: Any
    num_systems: int
    num_atoms: int
    atoms_ptr: torch.Tensor  # int64 (B+1,)
    atom_index: torch.Tensor | None  # int64 (N,), system of each atom, when the batch has it
    atom_fields: dict[str, torch.Tensor]
    system_fields: dict[str, torch.Tensor]

    @property
    def layout(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Names of the atom and system fields; pass it back to ``of`` to skip discovery."""
        return tuple(self.atom_fields), tuple(self.system_fields)

    @classmethod
    def of(cls, batch: Any, layout: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> "BatchView":
        """The view of ``batch``. With the ``layout`` of an earlier view of the same kind of batch,
        only those names are looked up (discovery scans every attribute: it costs tens of µs per
        call); a field that went missing or changed level falls back to full discovery."""
        if layout is not None:
            view = cls._from_layout(batch, layout)
            if view is not None:
                return view
        tensors = _tensor_attributes(batch)
        ptr = _get(batch, "batch_ptr")
        if ptr is None:
            ptr = _get(batch, "ptr")
        idx = _get(batch, "batch_idx")
        if idx is None:
            idx = _get(batch, "batch") if isinstance(_get(batch, "batch"), torch.Tensor) else None
        ref = tensors.get("positions")
        if ref is None:
            raise BatchError("batch has no 'positions' tensor: cannot tell how many atoms it holds")
        num_atoms = int(ref.shape[0])
        if ptr is not None:
            num_systems = int(ptr.shape[0]) - 1
            atoms_ptr = ptr.reshape(-1).to(torch.int64)
        else:
            num_systems = _num_systems_without_ptr(batch, tensors)
            if idx is None:
                raise BatchError("batch has neither 'batch_ptr' nor 'batch_idx': cannot split atoms into systems")
            counts = torch.bincount(idx.reshape(-1), minlength=num_systems)
            atoms_ptr = torch.zeros(num_systems + 1, dtype=torch.int64, device=ref.device)
            torch.cumsum(counts, 0, out=atoms_ptr[1:])
        atom_fields: dict[str, torch.Tensor] = {}
        system_fields: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            lead = int(t.shape[0])
            if name in ATOM_FIELDS:
                if lead == num_atoms:
                    atom_fields[name] = t
            elif name in SYSTEM_FIELDS:
                if lead == num_systems:
                    system_fields[name] = t
            elif lead == num_atoms and lead != num_systems:
                atom_fields[name] = t
            elif lead == num_systems and lead != num_atoms:
                system_fields[name] = t
        return cls(batch, num_systems, num_atoms, atoms_ptr, None if idx is None else idx.reshape(-1),
                   atom_fields, system_fields)

    @classmethod
    def _from_layout(cls, batch: Any, layout: tuple[tuple[str, ...], tuple[str, ...]]) -> "BatchView | None":
        ptr = _get(batch, "batch_ptr")
        pos = _get(batch, "positions")
        if not isinstance(ptr, torch.Tensor) or not isinstance(pos, torch.Tensor):
            return None
        n_sys, n_atoms = int(ptr.shape[0]) - 1, int(pos.shape[0])
        atom, system = {}, {}
        for names, dst, lead in ((layout[0], atom, n_atoms), (layout[1], system, n_sys)):
            for name in names:
                t = _get(batch, name)
                if not isinstance(t, torch.Tensor) or t.dim() < 1 or int(t.shape[0]) != lead:
                    return None
                dst[name] = t
        idx = _get(batch, "batch_idx")
        return cls(batch, n_sys, n_atoms, ptr.reshape(-1).to(torch.int64),
                   idx.reshape(-1) if isinstance(idx, torch.Tensor) else None, atom, system)

    @property
    def device(self) -> torch.device:
        return self.atom_fields["positions"].device

    def system_scalar(self, name: str) -> torch.Tensor | None:
        """A per-system field flattened to (B,), e.g. energy (B,1) -> (B,); None when absent."""
        t = self.system_fields.get(name)
        if t is None:
            return None
        # flatten, not reshape(B, -1): an empty batch (B == 0) has no -1 to infer
        return t.flatten(1)[:, 0] if t.dim() > 1 else t

    def sample_ids(self) -> torch.Tensor:
        sid = self.system_scalar("system_id")
        if sid is None:
            return torch.arange(self.num_systems, device=self.atoms_ptr.device, dtype=torch.int64)
        return sid.to(torch.int64)

    def status(self) -> torch.Tensor:
        st = self.system_scalar("status")
        if st is None:
            return torch.zeros(self.num_systems, device=self.atoms_ptr.device, dtype=torch.int64)
        return st.to(torch.int64)

    def atom_to_system(self) -> torch.Tensor:
        """System index of every atom (B-aware, no sync): the batch's own when present."""
        if self.atom_index is not None:
            return self.atom_index.to(torch.int64)
        counts = self.atoms_ptr[1:] - self.atoms_ptr[:-1]
        return torch.repeat_interleave(
            torch.arange(self.num_systems, device=counts.device), counts, output_size=self.num_atoms)


class HeldTensor:
    """A batch tensor remembered by identity, data pointer and shape, without keeping it (or its
    autograd graph) alive: what lets a hook reuse the work of its last firing (views, a bound
    kernel launch) while an engine updates its batch in place. ``is_(t)``: ``t`` is still that
    very tensor, on the same storage and shape (an in-place ``resize_`` or ``set_`` changes one)."""

    __slots__ = ("ref", "ptr", "shape")

    def __init__(self, t: torch.Tensor):
        self.ref, self.ptr, self.shape = weakref.ref(t), t.data_ptr(), t.shape

    def is_(self, t: Any) -> bool:
        return t is not None and t is self.ref() and t.data_ptr() == self.ptr and t.shape == self.shape


def _num_systems_without_ptr(batch: Any, tensors: dict[str, torch.Tensor]) -> int:
    for attr in ("num_graphs", "num_systems", "batch_size"):
        v = _get(batch, attr)
        if isinstance(v, int):
            return v
    for name in ("energy", "system_id", "status", "cell"):
        if name in tensors:
            return int(tensors[name].shape[0])
    raise BatchError("cannot tell how many systems the batch holds: give it batch_ptr or num_graphs")

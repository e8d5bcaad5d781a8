"""Demo workload: batches of argon-like Lennard-Jones clusters and a vectorised LJ model.

Why this exists: the recording hooks need a realistic, dependency-free simulation to drive them on
any machine (CPU or CUDA, one rank or many). The batch mirrors the fields and layout of nvalchemi's
``Batch`` (atom-level, system-level and CSR pointer tensors) so a hook that works here works there.

Units follow nvalchemi/ASE: positions in Å, energies in eV, masses in amu, forces in eV/Å and
velocities in sqrt(eV/amu). The derived time unit is Å·sqrt(amu/eV) ≈ 10.18 fs; see ``FS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "ARGON_EPSILON",
    "ARGON_MASS",
    "ARGON_SIGMA",
    "ARGON_Z",
    "FS",
    "KB_EV",
    "DemoBatch",
    "LennardJones",
    "fmax_per_system",
    "kinetic_energy",
    "make_batch",
    "maxwell_boltzmann_velocities",
    "segment_max",
    "segment_sum",
    "system_rng",
    "temperature",
]

#: Boltzmann constant in eV/K (CODATA 2018, as nvalchemi's LoggingHook uses).
KB_EV = 8.617333262e-5
#: One femtosecond in the internal time unit Å·sqrt(amu/eV) (same value as ``ase.units.fs``).
FS = 0.09822694788464063
#: Argon-like LJ parameters (eV, Å), mass (amu) and atomic number.
ARGON_EPSILON = 0.0104
ARGON_SIGMA = 3.40
ARGON_MASS = 39.948
ARGON_Z = 18


# --------------------------------------------------------------------------------------------------
# segment reductions (device-side, no host sync)
# --------------------------------------------------------------------------------------------------
def segment_sum(values: torch.Tensor, batch_idx: torch.Tensor, num_systems: int) -> torch.Tensor:
    """Sum per-atom ``values`` (N, ...) into (B, ...) by system, on the values' device."""
    out = values.new_zeros((num_systems,) + tuple(values.shape[1:]))
    return out.index_add_(0, batch_idx, values)


def segment_max(values: torch.Tensor, batch_idx: torch.Tensor, num_systems: int) -> torch.Tensor:
    """Max of per-atom scalars ``values`` (N,) per system (B,); 0 for a system without atoms."""
    out = values.new_zeros(num_systems)
    return out.scatter_reduce_(0, batch_idx, values, reduce="amax", include_self=False)


# --------------------------------------------------------------------------------------------------
# the batch
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class DemoBatch:
    """A batch of B systems with N atoms in total, laid out like nvalchemi's ``Batch``.

    Atom level (N, ...): ``positions`` (Å), ``velocities`` (sqrt(eV/amu)), ``forces`` (eV/Å),
    ``atomic_numbers`` int64, ``atomic_masses`` (amu). System level (B, ...): ``energy`` (B,1) eV,
    ``cell`` (B,3,3) Å, ``pbc`` (B,3) bool, ``stress`` (optional, None here), ``status`` (B,1) int64,
    ``system_id`` (B,1) int64. Pointers: ``batch_ptr`` (B+1,) int64 CSR offsets of atoms and
    ``batch_idx`` (N,) int64 system of each atom.

    Engines update the tensors in place, so a hook that keeps a reference sees current values.
    ``max_atoms`` is a host int (largest system), kept so that the padded LJ model never syncs.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    forces: torch.Tensor
    atomic_numbers: torch.Tensor
    atomic_masses: torch.Tensor
    energy: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    status: torch.Tensor
    system_id: torch.Tensor
    batch_ptr: torch.Tensor
    batch_idx: torch.Tensor
    stress: torch.Tensor | None = None
    max_atoms: int = field(default=0)

    ATOM_KEYS = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses")
    SYSTEM_KEYS = ("energy", "cell", "pbc", "stress", "status", "system_id")

    def __post_init__(self) -> None:
        if self.max_atoms <= 0:  # one sync at construction, never per step
            counts = self.batch_ptr[1:] - self.batch_ptr[:-1]
            self.max_atoms = int(counts.max().item()) if counts.numel() else 0

    # sizes come from shapes: the host knows them without a device sync
    @property
    def num_graphs(self) -> int:
        """Number of systems B (nvalchemi/PyG name)."""
        return int(self.batch_ptr.shape[0]) - 1

    @property
    def num_systems(self) -> int:
        """Number of systems B."""
        return self.num_graphs

    @property
    def num_nodes(self) -> int:
        """Number of atoms N (PyG name)."""
        return int(self.positions.shape[0])

    @property
    def num_atoms(self) -> int:
        """Number of atoms N."""
        return self.num_nodes

    @property
    def ptr(self) -> torch.Tensor:
        """Alias of ``batch_ptr`` (PyG name)."""
        return self.batch_ptr

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def atoms_per_system(self) -> torch.Tensor:
        """(B,) int64 atom counts, on device."""
        return self.batch_ptr[1:] - self.batch_ptr[:-1]

    def keys(self) -> list[str]:
        """Names of the tensor fields that are set (for generic batch readers)."""
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str) -> "DemoBatch":
        """A copy on ``device`` (tensors moved, host ints kept)."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return replace(self, **moved)

    def clone(self) -> "DemoBatch":
        """A deep copy of every tensor (for before/after comparisons)."""
        cloned = {
            f.name: (v.clone() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return replace(self, **cloned)

    def __repr__(self) -> str:
        return (
            f"DemoBatch(num_systems={self.num_systems}, num_atoms={self.num_atoms}, "
            f"max_atoms={self.max_atoms}, device={self.device}, dtype={self.positions.dtype})"
        )


def system_rng(seed: int, rank: int, stream: int = 0) -> np.random.Generator:
    """Independent random stream for (seed, rank, stream).

    Why SeedSequence: ranks seeded with ``seed + rank`` overlap between runs with adjacent seeds;
    spawning from the entropy tuple gives statistically independent streams per rank and purpose.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(stream)]))


def _fcc_cluster(n: int, spacing: float) -> np.ndarray:
    """The ``n`` FCC sites nearest to an atom at the origin (a compact, near-spherical cluster)."""
    a = spacing * np.sqrt(2.0)  # cubic lattice constant for nearest-neighbour distance `spacing`
    k = int(np.ceil((n * 4) ** (1.0 / 3.0))) // 2 + 2
    r = np.arange(-k, k + 1)
    cube = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    sites = (cube[:, None, :] + basis[None, :, :]).reshape(-1, 3) * a
    order = np.lexsort((sites[:, 2], sites[:, 1], sites[:, 0], np.round((sites**2).sum(1), 6)))
    return sites[order[:n]]


def maxwell_boltzmann_velocities(
    masses: torch.Tensor,
    batch_idx: torch.Tensor,
    num_systems: int,
    temperature_k: float,
    rng: np.random.Generator,
    *,
    remove_com: bool = True,
) -> torch.Tensor:
    """Velocities (N,3) in sqrt(eV/amu) drawn from Maxwell-Boltzmann at ``temperature_k``.

    Drawn on the host from ``rng`` (reproducible on every device), then moved to the masses' device.
    The centre-of-mass velocity of each system is removed so clusters in vacuum do not drift.
    """
    m = masses.detach().to("cpu", torch.float64)
    z = torch.from_numpy(rng.standard_normal((m.shape[0], 3)))
    v = z * torch.sqrt(KB_EV * float(temperature_k) / m)[:, None]
    if remove_com and m.shape[0] > 0:
        bi = batch_idx.to("cpu")
        p = segment_sum(m[:, None] * v, bi, num_systems)
        mt = segment_sum(m, bi, num_systems).clamp_min(1e-30)
        v = v - (p / mt[:, None])[bi]
    return v.to(device=masses.device, dtype=masses.dtype)


def make_batch(
    n_systems: int,
    *,
    min_atoms: int = 8,
    max_atoms: int = 64,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    temperature_k: float = 30.0,
    perturbation: float = 0.15,
    vacuum: float = 10.0,
) -> DemoBatch:
    """Draw ``n_systems`` argon-like LJ clusters for ``rank``.

    Each system has an atom count drawn uniformly from [min_atoms, max_atoms]; its geometry is the
    compact FCC cluster of that size at the LJ nearest-neighbour distance 2^(1/6)σ, scaled by a random
    factor in [0.97, 1.06] and perturbed by Gaussian noise (``perturbation`` Å), so forces are non-zero
    and every system needs a different number of FIRE steps. Velocities are Maxwell-Boltzmann at
    ``temperature_k`` (centre-of-mass motion removed). Clusters sit in vacuum: ``pbc`` is False and
    ``cell`` is a cubic box with ``vacuum`` Å of margin, the cluster centred in it.

    Randomness comes only from (seed, rank), so each rank draws its own systems and a re-launched job
    draws the same ones. ``system_id = rank * n_systems + i`` is a global index, unique across ranks
    provided all ranks use the same ``n_systems`` (the demo does), and contiguous over 0..world*n-1.
    Everything is generated on the host and moved to ``device`` once.
    """
    if not 0 <= rank < max(world_size, 1):
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if not 1 <= min_atoms <= max_atoms:
        raise ValueError(f"need 1 <= min_atoms <= max_atoms, got {min_atoms}, {max_atoms}")
    rng = system_rng(seed, rank, 0)
    counts = rng.integers(min_atoms, max_atoms + 1, size=n_systems)
    r0 = 2.0 ** (1.0 / 6.0) * ARGON_SIGMA
    pos_list, cells = [], []
    for n in counts:
        xyz = _fcc_cluster(int(n), r0) * rng.uniform(0.97, 1.06)
        xyz = xyz + rng.normal(0.0, perturbation, size=xyz.shape)
        xyz = xyz - xyz.mean(0)
        side = 2.0 * float(np.abs(xyz).max()) + vacuum
        pos_list.append(xyz + side / 2.0)
        cells.append(np.eye(3) * side)
    n_total = int(counts.sum())
    ptr = np.zeros(n_systems + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(counts)
    bidx = np.repeat(np.arange(n_systems, dtype=np.int64), counts)

    positions = torch.from_numpy(np.concatenate(pos_list) if pos_list else np.zeros((0, 3)))
    masses = torch.full((n_total,), ARGON_MASS, dtype=torch.float64)
    batch_idx = torch.from_numpy(bidx)
    velocities = maxwell_boltzmann_velocities(
        masses, batch_idx, n_systems, temperature_k, system_rng(seed, rank, 1)
    )
    dev = torch.device(device)
    fkw: dict[str, Any] = {"device": dev, "dtype": dtype}
    ikw: dict[str, Any] = {"device": dev, "dtype": torch.int64}
    return DemoBatch(
        positions=positions.to(**fkw),
        velocities=velocities.to(**fkw),
        forces=torch.zeros((n_total, 3), **fkw),
        atomic_numbers=torch.full((n_total,), ARGON_Z, **ikw),
        atomic_masses=masses.to(**fkw),
        energy=torch.zeros((n_systems, 1), **fkw),
        cell=torch.from_numpy(np.stack(cells) if cells else np.zeros((0, 3, 3))).to(**fkw),
        pbc=torch.zeros((n_systems, 3), dtype=torch.bool, device=dev),
        status=torch.zeros((n_systems, 1), **ikw),
        system_id=(torch.arange(n_systems, dtype=torch.int64) + rank * n_systems)[:, None].to(dev),
        batch_ptr=torch.from_numpy(ptr).to(dev),
        batch_idx=batch_idx.to(dev),
        stress=None,
        max_atoms=int(counts.max()) if n_systems else 0,
    )


# --------------------------------------------------------------------------------------------------
# observables
# --------------------------------------------------------------------------------------------------
def kinetic_energy(batch: DemoBatch) -> torch.Tensor:
    """(B,) kinetic energy 1/2 Σ m v² per system in eV (device op, no sync)."""
    per_atom = 0.5 * batch.atomic_masses * (batch.velocities * batch.velocities).sum(-1)
    return segment_sum(per_atom, batch.batch_idx, batch.num_systems)


def temperature(batch: DemoBatch) -> torch.Tensor:
    """(B,) temperature 2 KE / (3 N k_B) in K, as nvalchemi's LoggingHook defines it."""
    n = batch.atoms_per_system.to(batch.positions.dtype).clamp_min(1)
    return 2.0 * kinetic_energy(batch) / (3.0 * n * KB_EV)


def fmax_per_system(batch: DemoBatch) -> torch.Tensor:
    """(B,) max over a system's atoms of ||F_i||₂ (the FIRE convergence measure)."""
    norms = torch.linalg.vector_norm(batch.forces, dim=-1)
    return segment_max(norms, batch.batch_idx, batch.num_systems)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class LennardJones(torch.nn.Module):
    """Batched Lennard-Jones energy and analytic forces for variable-size clusters.

    Why padded dense pairs: systems are small (≤ a few hundred atoms), so scattering the atoms into a
    (B, nmax, 3) block and evaluating all (B, nmax, nmax) pairs at once is a handful of large kernels
    with no Python loop over systems and no neighbour list; padding waste is bounded by nmax/mean.
    Forces are analytic (no autograd graph), energy is per system (B, 1). No cutoff: clusters in
    vacuum, so the potential is the exact, smooth LJ sum and NVE conserves energy well.

    ``__call__(batch)`` returns ``{"energy": (B,1), "forces": (N,3)}`` in the batch's dtype/device.
    The padding indices are cached per ``batch_ptr`` tensor, so repeated calls never sync.
    """

    def __init__(self, epsilon: float = ARGON_EPSILON, sigma: float = ARGON_SIGMA) -> None:
        super().__init__()
        self.epsilon = float(epsilon)
        self.sigma = float(sigma)
        self._cache_key: tuple[int, int, int, str, str] | None = None
        self._pad_index: torch.Tensor | None = None
        self._pair_mask: torch.Tensor | None = None
        self._pair_maskf: torch.Tensor | None = None
        self._nmax = 0

    def _layout(self, batch: DemoBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        ptr = batch.batch_ptr
        key = (id(ptr), ptr._version, int(batch.positions.shape[0]), str(batch.positions.device),
               str(batch.positions.dtype))
        if key != self._cache_key:
            nmax = int(getattr(batch, "max_atoms", 0) or 0)
            if nmax <= 0:  # generic batch without the host hint: one sync per layout change
                nmax = int((ptr[1:] - ptr[:-1]).max().item()) if ptr.numel() > 1 else 0
            b = int(ptr.shape[0]) - 1
            bidx = batch.batch_idx
            local = torch.arange(bidx.shape[0], device=ptr.device) - ptr[bidx]
            pad_index = bidx * nmax + local
            valid = torch.zeros(b * nmax, dtype=torch.bool, device=ptr.device)
            valid[pad_index] = True
            valid = valid.view(b, nmax)
            eye = torch.eye(nmax, dtype=torch.bool, device=ptr.device)
            self._pair_mask = valid[:, :, None] & valid[:, None, :] & ~eye
            self._pair_maskf = self._pair_mask.to(batch.positions.dtype)
            self._pad_index, self._nmax, self._cache_key = pad_index, nmax, key
        assert self._pad_index is not None and self._pair_mask is not None
        return self._pad_index, self._pair_mask, self._nmax

    def forward(self, batch: DemoBatch) -> dict[str, torch.Tensor]:
        pad_index, pair_mask, nmax = self._layout(batch)
        pos = batch.positions
        b = batch.num_systems
        padded = pos.new_zeros(b * nmax, 3).index_copy_(0, pad_index, pos).view(b, nmax, 3)
        # Relative to each system's first atom: keeps magnitudes small for the float32 matmul below.
        padded = padded - padded[:, :1]
        # r_ij² component by component on (B, n, n) planes: ~4x faster on CPU than a (B, n, n, 3)
        # difference tensor reduced over its last, length-3 axis.
        r2 = None
        for comp in padded.unbind(-1):
            d = comp[:, :, None] - comp[:, None, :]
            r2 = d * d if r2 is None else r2.addcmul_(d, d)
        assert r2 is not None
        r2 = torch.where(pair_mask, r2, torch.ones_like(r2))  # padded/self pairs: harmless 1
        inv_r2 = self._pair_maskf / r2  # exactly 0 for padded/self pairs
        s2 = (self.sigma * self.sigma) * inv_r2
        s6 = s2 * s2 * s2
        s12 = s6 * s6
        energy = (2.0 * self.epsilon) * (s12 - s6).sum((1, 2))  # 4ε Σ_{i<j} = 2ε Σ_{i≠j}
        coef = (24.0 * self.epsilon) * (2.0 * s12 - s6) * inv_r2
        # F_i = Σ_j c_ij (r_i - r_j) = (Σ_j c_ij) r_i - (C R)_i: a batched matmul instead of a
        # (B, n, n, 3) product and reduction (about 5x faster on CPU, same float32 accuracy).
        f_pad = coef.sum(-1, keepdim=True) * padded - torch.bmm(coef, padded)
        forces = f_pad.reshape(b * nmax, 3).index_select(0, pad_index)
        return {"energy": energy[:, None], "forces": forces}

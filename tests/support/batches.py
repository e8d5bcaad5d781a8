"""Synthetic batches for hook tests: variable atom counts, nvalchemi's field names and shapes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
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

    @property
    def num_graphs(self) -> int:
        return int(self.batch_ptr.shape[0]) - 1


@dataclass
class Ctx:
    batch: Any
    step_count: int = 0
    converged_mask: torch.Tensor | None = None
    workflow: Any = None
    model: Any = None
    global_rank: int = 0


def make_batch(counts, *, seed=0, first_id=0, dtype=torch.float32, device="cpu") -> Batch:
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(counts, dtype=torch.int64)
    B, N = counts.numel(), int(counts.sum())
    ptr = torch.zeros(B + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    b = Batch(
        positions=torch.randn(N, 3, generator=g, dtype=dtype) * 3,
        velocities=torch.randn(N, 3, generator=g, dtype=dtype) * 0.05,
        forces=torch.randn(N, 3, generator=g, dtype=dtype),
        atomic_numbers=torch.randint(1, 30, (N,), generator=g),
        atomic_masses=(torch.rand(N, generator=g, dtype=dtype) * 50 + 1),
        energy=torch.randn(B, 1, generator=g, dtype=dtype) * 10,
        cell=torch.randn(B, 3, 3, generator=g, dtype=dtype),
        pbc=torch.rand(B, 3, generator=g) > 0.5,
        status=torch.randint(0, 3, (B, 1), generator=g),
        system_id=torch.arange(first_id, first_id + B).reshape(B, 1),
        batch_ptr=ptr,
        batch_idx=torch.repeat_interleave(torch.arange(B), counts),
    )
    return b.to(device) if device != "cpu" else b


def _to(self, device):
    return Batch(**{k: v.to(device) for k, v in vars(self).items()})


Batch.to = _to


def perturb(b: Batch, seed: int) -> None:
    """Change the state in place, as an integrator would."""
    g = torch.Generator().manual_seed(seed)
    for t in (b.positions, b.velocities, b.forces, b.energy):
        t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device))


def make_empty_batch(**kw) -> Batch:
    """A batch whose systems all retired: 0 systems, 0 atoms (``system_id`` of shape (0, 1))."""
    return make_batch([], **kw)


def with_dtype(b: Batch, dtype: torch.dtype, fields=("positions", "velocities", "forces", "energy")) -> Batch:
    """A copy of ``b`` with ``fields`` cast to ``dtype`` (e.g. bfloat16, as a mixed-precision model
    hands them over); the reference values are then those of the cast tensors."""
    out = Batch(**{k: v.clone() for k, v in vars(b).items()})
    for f in fields:
        setattr(out, f, getattr(b, f).to(dtype))
    return out


def with_grad(b: Batch) -> Batch:
    """A copy of ``b`` whose energy and forces come straight from an autograd model: energy a
    function of positions (a leaf that requires grad), forces its negative gradient kept in the
    graph (``create_graph``), so all three require grad."""
    out = Batch(**{k: v.clone() for k, v in vars(b).items()})
    pos = out.positions.clone().requires_grad_(True)
    e_atom = (pos * pos).sum(1) * 0.5
    energy = torch.zeros(out.num_graphs, dtype=pos.dtype).index_add(0, out.batch_idx, e_atom)
    forces = -torch.autograd.grad(energy.sum(), pos, create_graph=True)[0]
    out.positions, out.energy, out.forces = pos, energy.reshape(-1, 1), forces
    return out

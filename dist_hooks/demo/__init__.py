"""Demo workload: argon-like LJ clusters, a batched LJ model and an nvalchemi-style engine.

Run it with ``python -m dist_hooks.demo --help`` (single process, torchrun, srun or mpiexec).
"""
from __future__ import annotations

from .dynamics import FIRE, BaseDynamics, HookContext, Langevin, VelocityVerlet, hook_lifetime
from .workload import (
    FS,
    KB_EV,
    DemoBatch,
    LennardJones,
    fmax_per_system,
    kinetic_energy,
    make_batch,
    maxwell_boltzmann_velocities,
    temperature,
)

__all__ = [
    "FIRE",
    "FS",
    "KB_EV",
    "BaseDynamics",
    "DemoBatch",
    "HookContext",
    "Langevin",
    "LennardJones",
    "VelocityVerlet",
    "fmax_per_system",
    "hook_lifetime",
    "kinetic_energy",
    "make_batch",
    "maxwell_boltzmann_velocities",
    "temperature",
]

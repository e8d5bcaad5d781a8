"""LoggingHook's default per-system values, computed once per firing into a row of the device ring.

Why an interface with two implementations: on a launch-bound step every torch op the hook issues
costs the simulation thread a kernel launch (5-10 µs on a GPU, 1.5-3 µs of dispatch on a CPU), and
the default scalars take about forty of them in eager torch (profiled). :class:`FusedScalars`
(:mod:`.warp_scalars`) computes all of them in one NVIDIA Warp kernel launch, on CPU and CUDA
alike; :class:`EagerScalars` is the torch reference and the fallback where Warp is missing or the
batch is one the kernel does not take (another dtype, a field missing). Both write the same rows
of the same ring, so the rest of the hook does not know which ran; the figures that chose this are
in docs/performance.md ("One launch per firing").

Rows of a ring slot (float64, one column per system): ``sample_id``, ``status``, then
:data:`FLOAT_COLUMNS` (energy, fmax, temperature). Values match nvalchemi's LoggingHook:
fmax = max over a system's atoms of ||F_i||, temperature = sum(m v^2) / (3 N k_B).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

from ..batch import BatchView
from ..store.csv_log import FLOAT_COLUMNS

KB_EV_PER_K = 8.617333262e-5  # Boltzmann constant in eV/K, as nvalchemi uses it
#: the atom fields each reduced scalar needs; they must be floating point (checked per layout)
REDUCED_FIELDS = {"fmax": ("forces",), "temperature": ("velocities", "atomic_masses")}
#: the ring rows every implementation writes, in order
ROWS = ("sample_id", "status", *FLOAT_COLUMNS)
#: reduced in float32 instead of their own dtype (a row sum of squares in bfloat16 keeps ~3 digits)
_HALF = (torch.bfloat16, torch.float16)

Mode = Literal["auto", "fused", "eager"]
MODES = ("auto", "fused", "eager")


class SystemScalars(ABC):
    """Writes :data:`ROWS` of one firing into ``ring[index]`` (ring: float64 (K, C, B)) on the
    current stream, issuing device work only (no host sync). Called by LoggingHook on the
    simulation thread, once per firing, after :meth:`accepts` said yes for this batch layout."""

    #: what ``LoggingHook.reductions_used`` reports
    name: str

    @abstractmethod
    def accepts(self, view: BatchView) -> bool:
        """Whether this implementation can reduce batches of ``view``'s layout, dtypes, device."""

    @abstractmethod
    def __call__(self, view: BatchView, ring: torch.Tensor, index: int) -> bool:
        """Reduce ``view`` into ``ring[index, :len(ROWS)]``; the caller holds ``torch.no_grad``.
        False: nothing done, this batch is not one this implementation takes (its dtypes changed
        under the same field names): choose again."""

    def replay(self, batch: Any, ring: torch.Tensor, index: int) -> bool:
        """Reduce ``batch`` without building its view, when nothing changed since the last call
        (same tensors, same ring); False when the caller must take the full path. Only worth
        having where the per-firing work is a launch or two: never, by default."""
        return False


class EagerScalars(SystemScalars):
    """The torch reference: a few ops per scalar, any dtype and device, missing fields as NaN."""

    name = "eager"

    def __init__(self, missing: frozenset[str] = frozenset(), replaced: frozenset[str] = frozenset()):
        self.missing = missing  # default scalars whose fields the batch lacks: left NaN
        self.replaced = replaced  # default scalars a custom one computes instead: left alone
        self._ones: dict = {}

    def accepts(self, view: BatchView) -> bool:
        return True

    def __call__(self, view: BatchView, ring: torch.Tensor, index: int) -> bool:
        out = ring[index]
        B = view.num_systems
        out[0].copy_(view.sample_ids())
        out[1].copy_(view.status())
        for row, name in enumerate(FLOAT_COLUMNS, start=2):
            dst = out[row]
            if name in self.replaced:
                continue
            if name in self.missing:
                dst.fill_(float("nan"))
            elif name == "energy":
                dst.copy_(view.system_scalar("energy"))
            elif name == "fmax":
                # max of squared norms, square root of the B maxima only; (F*F) @ 1 is a row sum
                f = _at_least_float32(view.atom_fields["forces"])
                f2 = (f * f) @ self._ones3(f)
                m2 = torch.zeros(B, dtype=f2.dtype, device=f2.device)
                m2.scatter_reduce_(0, view.atom_to_system(), f2, "amax", include_self=False)
                dst.copy_(m2).sqrt_()
            else:  # temperature
                v = _at_least_float32(view.atom_fields["velocities"])
                m = view.atom_fields["atomic_masses"].reshape(-1)
                mv2 = ((v * v) @ self._ones3(v)).mul_(m)
                dst.zero_().index_add_(0, view.atom_to_system(), mv2.to(torch.float64))
                counts = (view.atoms_ptr[1:] - view.atoms_ptr[:-1]).to(torch.float64)
                dst.div_(counts.mul_(3.0 * KB_EV_PER_K))
        return True

    def _ones3(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        t = self._ones.get(key)
        if t is None:
            t = self._ones[key] = torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
        return t


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def warp_available() -> bool:
    """Whether NVIDIA Warp imports here (the ``fast`` extra); imported only when asked."""
    try:
        import warp  # noqa: F401
    except ImportError:
        return False
    return True


def required_dtype_problem(view: BatchView, custom: Any) -> tuple[str, str, torch.dtype] | None:
    """The first (scalar, field, dtype) whose field a default scalar reduces but is not floating
    point, skipping scalars the user computes instead (``custom``); None when all are fine."""
    for scalar, fields in REDUCED_FIELDS.items():
        if scalar in custom:
            continue
        for f in fields:
            t = view.atom_fields.get(f)
            if t is not None and not t.dtype.is_floating_point:
                return scalar, f, t.dtype
    return None

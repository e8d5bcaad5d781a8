"""Pack several tensors into one flat host buffer with one copy each, and unpack them as numpy views.

Why: a firing's fields go to the host as a handful of copies into one reused (pinned) buffer, and
the writer thread reads them back as zero-copy numpy views. Offsets are aligned so every view is
naturally aligned for its dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 64
#: dtypes that numpy (hence Zarr) lacks, and what they are recorded as instead: exactly, with no
#: extra device op (the copy a firing makes anyway converts)
RECORDED_AS = {torch.bfloat16: torch.float32}


@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def recorded_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a tensor of ``dtype`` is recorded as (itself, or :data:`RECORDED_AS`); None when
    numpy has no equivalent (float8, complex32, ...): such a tensor cannot be recorded."""
    dtype = RECORDED_AS.get(dtype, dtype)
    try:
        _numpy_dtype(dtype)
    except (TypeError, RuntimeError):
        return None
    return dtype


def plan(tensors: dict[str, torch.Tensor]) -> tuple[list[Slot], int]:
    """Byte layout for ``tensors`` (from shapes only: no device sync), each in its recorded dtype."""
    slots, off = [], 0
    for name, t in tensors.items():
        s = Slot(name, off, RECORDED_AS.get(t.dtype, t.dtype), tuple(int(d) for d in t.shape))
        slots.append(s)
        off += -(-s.nbytes // _ALIGN) * _ALIGN
    return slots, off


def copy_into(buf: torch.Tensor, slots: list[Slot], tensors: dict[str, torch.Tensor]) -> None:
    """Issue one (non-blocking) copy per tensor into its place in the uint8 buffer ``buf``
    (converting to the slot's dtype where it differs)."""
    for s in slots:
        dst = buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        dst.copy_(tensors[s.name], non_blocking=True)


def unpack(buf: torch.Tensor, slots: list[Slot]) -> dict[str, np.ndarray]:
    """Numpy views of the packed tensors (valid while ``buf`` is not reused)."""
    raw = buf.numpy()
    out = {}
    for s in slots:
        out[s.name] = raw[s.offset:s.offset + s.nbytes].view(_numpy_dtype(s.dtype)).reshape(s.shape)
    return out


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype

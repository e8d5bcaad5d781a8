"""Pack a firing's tensors into one flat byte buffer with one ``torch.cat``, and unpack them as numpy.

Why: a snapshot firing must cost about one launch however many fields the batch has. Every tensor
is seen as its raw bytes (a zero-copy uint8 view of a contiguous tensor) and one ``cat`` of those
views fills the buffer: on CPU straight into the host buffer, on CUDA into one device staging
tensor that a single device-to-host copy then moves. The views are made once per batch layout and
kept (a :class:`Staging`) while the batch keeps its tensors, as engines that update in place do, so
a firing on the same tensors issues no per-field op at all. Bytes are staged in the tensor's own
dtype; what numpy lacks (bfloat16) is converted exactly by the writer thread, on the host
(:func:`unpack`), which costs the step nothing and moves half the bytes.

Slots are laid out largest item size first, so every slot is naturally aligned (what numpy needs
for aligned views) without padding between them.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import HeldTensor

#: dtypes that numpy (hence Zarr) lacks, and what they are recorded as instead, exactly: the bytes
#: are staged as they are and :func:`unpack` converts (bfloat16 -> float32 is a 16-bit shift)
RECORDED_AS = {torch.bfloat16: torch.float32}


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes lie in a packed buffer; ``dtype`` is the staged (the tensor's own)
    dtype, :attr:`recorded` the one :func:`unpack` returns."""

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

    @property
    def recorded(self) -> torch.dtype:
        return RECORDED_AS.get(self.dtype, self.dtype)


def recorded_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a tensor of ``dtype`` is recorded as (itself, or :data:`RECORDED_AS`); None when
    numpy has no equivalent (float8, complex32, ...): such a tensor cannot be recorded."""
    dtype = RECORDED_AS.get(dtype, dtype)
    try:
        _numpy_dtype(dtype)
    except (TypeError, RuntimeError):
        return None
    return dtype


def plan(tensors: Mapping[str, torch.Tensor]) -> tuple[list[Slot], int]:
    """Byte layout for ``tensors`` (from shapes only: no device sync): slots in the mapping's order,
    bytes in decreasing item size (a stable order), so each offset is a multiple of its item size."""
    items = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    offsets, off = [0] * len(items), 0
    for i in _by_itemsize([dtype for _, dtype, _ in items]):
        offsets[i] = off
        n = items[i][1].itemsize
        for d in items[i][2]:
            n *= d
        off += n
    return [Slot(name, o, dtype, shape) for (name, dtype, shape), o in zip(items, offsets)], off


def byte_order(slots: list[Slot]) -> list[int]:
    """Indices of ``slots`` in the order their bytes lie in the buffer."""
    return _by_itemsize([s.dtype for s in slots])


def _by_itemsize(dtypes: list[torch.dtype]) -> list[int]:
    return sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize)  # stable


def aliases(t: torch.Tensor) -> bool:
    """Whether :func:`byte_view` of ``t`` is a view of ``t``'s memory (so it can be kept and shows
    later in-place updates) rather than a copy."""
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


def byte_view(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``t``'s elements as a 1-D uint8 tensor on ``device``: a view when :func:`aliases`, else made
    contiguous (one copy) first. Call under ``no_grad`` when ``t`` may require grad and not alias."""
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if device is not None and t.device != device:
        t = t.to(device)
    if t.dim() != 1 or not t.is_contiguous():
        t = t.ravel()
    return t.view(torch.uint8)


class Staging:
    """The packing of one batch layout and shape, and the byte views one ``cat`` reads, kept across
    firings while they stay valid.

    ``tensors``: the firing's tensors in column order. ``attrs``: for those read from a batch
    attribute, its name; such a tensor that aliases its bytes is *kept* — its view is made once and
    checked each firing by object identity, data pointer and shape (an in-place ``resize_``/``set_``
    changes one of them). A tensor replaced by one of the same dtype, shape and device is viewed
    anew without re-planning. The others (not contiguous, on another device, or passed each firing
    as ``given``, like the converged mask) are viewed each firing. ``reuse``: the previous staging,
    whose views of unchanged tensors are taken over.

    What it costs: the kept views hold the storage (not the tensor, nor its autograd graph) of
    the tensors last staged, until the next re-staging or the hook's close.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], attrs: Mapping[str, str], *,
                 device: torch.device, reuse: "Staging | None" = None):
        self.slots, self.nbytes = plan(tensors)
        self.device = device
        old = {}  # views of the previous staging's kept tensors, by tensor
        if reuse is not None:
            old = {id(k[1].ref()): (k, reuse._views[k[0]]) for k in reuse._kept
                   if k[1].ref() is not None}
        self._views: list[torch.Tensor] = []  # byte order; fresh positions are refilled each firing
        # kept: [position, HeldTensor, attr, dtype]; held weakly, so that a tensor the engine
        # dropped (and its autograd graph) is not kept alive by us (a uint8 view holds the
        # storage only)
        self._kept: list[list[Any]] = []
        self._fresh: list[tuple[int, str, str | None, torch.dtype, torch.Size, torch.device]] = []
        self._fresh_grad = False
        with torch.no_grad():
            for pos, i in enumerate(byte_order(self.slots)):
                name = self.slots[i].name
                t, attr = tensors[name], attrs.get(name)
                if attr is not None and aliases(t) and t.device == device:
                    hit = old.get(id(t))
                    same = hit is not None and hit[0][1].is_(t)
                    self._views.append(hit[1] if same else byte_view(t))
                    self._kept.append([pos, HeldTensor(t), attr, t.dtype])
                else:
                    self._views.append(byte_view(t, device))
                    self._fresh.append((pos, name, attr, t.dtype, t.shape, t.device))
                    self._fresh_grad |= attr is not None
        #: the views of the firing this staging was made for
        self.first = self._views

    def views(self, batch: Any, given: Mapping[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """This firing's byte views of ``batch`` (and ``given``), in buffer order; None when the
        batch no longer fits this staging (a tensor changed dtype, shape or device, or went): then
        make a new one. No device op unless a tensor is viewed anew; no host sync."""
        views, stale = self._views, None
        for k in self._kept:
            u = getattr(batch, k[2], None)
            if k[1].is_(u):
                continue
            if not isinstance(u, torch.Tensor) or u.dtype != k[3] or u.shape != k[1].shape \
                    or u.device != self.device or not aliases(u):
                return None
            stale = [] if stale is None else stale
            stale.append((k, u))
        for k, u in stale or ():  # replaced by equal-layout tensors: view those, keep them
            k[1] = HeldTensor(u)
            views[k[0]] = byte_view(u)
        if not self._fresh:
            return views
        views = list(views)
        with torch.no_grad() if self._fresh_grad else nullcontext():
            for pos, name, attr, dtype, shape, device in self._fresh:
                u = given.get(name) if attr is None else getattr(batch, attr, None)
                if not isinstance(u, torch.Tensor) or u.dtype != dtype or u.shape != shape \
                        or u.device != device:
                    return None
                views[pos] = byte_view(u, self.device)
        return views


def unpack(buf: torch.Tensor, slots: list[Slot]) -> dict[str, np.ndarray]:
    """The packed tensors as numpy arrays in their recorded dtype: zero-copy views of ``buf``
    (valid while it is not reused), except what :data:`RECORDED_AS` converts (a new array)."""
    raw = buf.numpy()
    out = {}
    for s in slots:
        a = raw[s.offset:s.offset + s.nbytes]
        if s.dtype == torch.bfloat16:  # exact: a bfloat16 is the upper half of its float32
            a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = a.view(_numpy_dtype(s.dtype))
        out[s.name] = a.reshape(s.shape)
    return out


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype

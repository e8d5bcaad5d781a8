"""One NVIDIA Warp kernel for LoggingHook's default scalars: a thread per system over its CSR atoms.

Imported only when Warp is installed and asked for (``LoggingHook`` chooses per batch layout):
importing Warp and compiling the kernel take seconds the first time on a machine (the kernel is
cached on disk, in Warp's kernel cache, for every later process).

Why the launch is recorded: ``wp.launch`` packs its arguments in Python on every call (~20 µs
here), and wrapping a torch tensor costs a few µs more. A recorded launch (``record_cmd=True``)
replays in ~4 µs; each argument is re-bound only when its tensor's storage or shape changed (an
engine that writes forces in place never re-binds), and the whole launch is rebuilt only when the
dtypes, the number of systems or the ring changed.
"""
from __future__ import annotations

from typing import Any

import torch
import warp as wp

from ..batch import BatchView, HeldTensor
from .reductions import KB_EV_PER_K, ROWS, SystemScalars

_FLOATS = (torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)
_HAS_SAMPLE_ID, _HAS_STATUS = 1, 2
wp.set_module_options({"enable_backward": False})  # forward only: compiles in half the time


@wp.kernel
def _system_scalars(forces: wp.array2d(dtype=Any), velocities: wp.array2d(dtype=Any),
                    masses: wp.array(dtype=Any), atoms_ptr: wp.array(dtype=Any),
                    energy: wp.array(dtype=Any), sample_id: wp.array(dtype=Any),
                    status: wp.array(dtype=Any), flags: int, ring: wp.array3d(dtype=wp.float64),
                    slot: int, three_kb: wp.float64):
    b = wp.tid()
    a0 = int(atoms_ptr[b])
    a1 = int(atoms_ptr[b + 1])
    f2max = wp.float64(0.0)
    mv2 = wp.float64(0.0)
    for a in range(a0, a1):
        # in the fields' own dtype, as the torch reference rounds: squares, their row sum (and
        # for velocities its product with the mass), then float64 for the max and the sum
        fx = forces[a, 0]
        fy = forces[a, 1]
        fz = forces[a, 2]
        f2 = wp.float64(fx * fx + fy * fy + fz * fz)
        if f2 > f2max or wp.isnan(f2):  # a NaN stays: no later atom compares above it
            if not wp.isnan(f2max):
                f2max = f2
        vx = velocities[a, 0]
        vy = velocities[a, 1]
        vz = velocities[a, 2]
        mv2 += wp.float64((vx * vx + vy * vy + vz * vz) * masses[a])
    sid = wp.float64(b)
    if flags & 1:
        sid = wp.float64(sample_id[b])
    st = wp.float64(0.0)
    if flags & 2:
        st = wp.float64(status[b])
    ring[slot, 0, b] = sid
    ring[slot, 1, b] = st
    ring[slot, 2, b] = wp.float64(energy[b])
    ring[slot, 3, b] = wp.sqrt(f2max)
    ring[slot, 4, b] = mv2 / (wp.float64(a1 - a0) * three_kb)


assert ROWS == ("sample_id", "status", "energy", "fmax", "temperature")  # the kernel's row order


#: the kernel's tensor arguments; the batch attribute each comes from when it is taken as it is
_ARGS = ("forces", "velocities", "atomic_masses", "atoms_ptr", "energy", "system_id", "status")
_RING, _SLOT = 8, 9  # positions of the ring and slot parameters


def _inputs(view: BatchView) -> tuple[list[torch.Tensor | None], int]:
    """The kernel's tensor arguments (None: absent, a placeholder is bound) and its flags."""
    sid = view.system_scalar("system_id")
    status = view.system_scalar("status")
    flags = (_HAS_SAMPLE_ID if sid is not None else 0) | (_HAS_STATUS if status is not None else 0)
    a = view.atom_fields
    return [a.get("forces"), a.get("velocities"), _flat(a.get("atomic_masses")), view.atoms_ptr,
            view.system_scalar("energy"), sid, status], flags


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.reshape(-1) if t is not None and t.dim() == 2 and t.shape[1] == 1 else t


def _sources(view: BatchView) -> tuple[tuple[str, HeldTensor | None], ...] | None:
    """The batch attributes the arguments were taken from (None: an absent optional one), for
    :meth:`FusedScalars.replay`; None when an argument was derived (atom offsets computed from
    ``batch_idx``, a converted dtype), so only the full path can bind it."""
    out = []
    for name in _ARGS:
        attr = "batch_ptr" if name == "atoms_ptr" else name
        t = getattr(view.batch, attr, None)
        if not isinstance(t, torch.Tensor):
            if name not in ("system_id", "status"):
                return None
            t = None  # absent: must stay absent
        out.append((attr, None if t is None else HeldTensor(t)))
    if view.atoms_ptr.data_ptr() != out[3][1].ptr:
        return None  # offsets not the batch's own tensor
    return tuple(out)


class FusedScalars(SystemScalars):
    """:data:`.reductions.ROWS` in one kernel launch (CPU or CUDA), float64 accumulation."""

    name = "fused"

    def __init__(self) -> None:
        self._cmd: Any = None  # the recorded launch
        self._signature: tuple | None = None  # what a new recording depends on
        self._bound: list[torch.Tensor] = []  # the tensors bound, kept alive
        self._keys: list[tuple] = []
        self._ring: torch.Tensor | None = None
        self._slot = -1
        self._src: tuple | None = None  # see _sources
        self._device: torch.device | None = None
        self._streams: dict[int, Any] = {}

    def refusal(self, view: BatchView) -> str | None:
        """Why the kernel cannot reduce this batch; None when it can."""
        if view.device.type not in ("cpu", "cuda"):
            return f"device {view.device}"
        tensors, _ = _inputs(view)
        for i, (name, t) in enumerate(zip(_ARGS, tensors)):
            if t is None:
                if i < 5:
                    return f"no {name}"
                continue
            want = _FLOATS if i in (0, 1, 2, 4) else _INTS
            if t.dtype not in want:
                return f"{name} is {t.dtype}"
            if i < 2 and (t.dim() != 2 or t.shape[1] != 3):
                return f"{name} has shape {tuple(t.shape)}, not (atoms, 3)"
            if i in (2, 4) and t.dim() != 1:
                return f"{name} has shape {tuple(t.shape)}"
        return None

    def accepts(self, view: BatchView) -> bool:
        return self.refusal(view) is None

    def replay(self, batch: Any, ring: torch.Tensor, index: int) -> bool:
        """Launch again with the arguments bound, if ``batch`` still holds the very tensors they
        were taken from (same objects, storage and shape) and ``ring`` is the one bound: the
        steady state of an engine that updates its batch in place. False: nothing launched, take
        the full path (a view of the batch, then ``self(view, ring, index)``)."""
        if ring is not self._ring or self._src is None:
            return False
        for attr, held in self._src:
            now = getattr(batch, attr, None)
            if not (now is None if held is None else held.is_(now)):
                return False
        self._launch(index)
        return True

    def __call__(self, view: BatchView, ring: torch.Tensor, index: int) -> bool:
        tensors, flags = _inputs(view)
        signature = (view.device, view.num_systems, tuple(ring.shape), flags,
                     tuple(None if t is None else t.dtype for t in tensors))
        if signature != self._signature:
            if self.refusal(view) is not None:
                self._src = None
                return False
            self._record(view, tensors, flags, ring)
            self._signature = signature
        else:
            for i, t in enumerate(tensors):
                if t is not None and (t.data_ptr(), t.shape, t.stride()) != self._keys[i]:
                    self._bind(i, t)
            if ring is not self._ring:
                self._cmd.set_param_at_index_from_ctype(_RING, wp.from_torch(ring, return_ctype=True))
                self._ring = ring
        self._src = _sources(view)
        self._launch(index)
        return True

    def _launch(self, index: int) -> None:
        if index != self._slot:
            self._cmd.set_param_at_index(_SLOT, index)
            self._slot = index
        if self._device.type == "cuda":
            self._cmd.launch(stream=self._stream(self._device))
        else:
            self._cmd.launch()

    def _record(self, view: BatchView, tensors: list, flags: int, ring: torch.Tensor) -> None:
        placeholder = torch.zeros(1, dtype=torch.int64, device=view.device)
        self._bound = [placeholder if t is None else t.detach() for t in tensors]
        self._keys = [(t.data_ptr(), t.shape, t.stride()) for t in self._bound]
        self._ring, self._device = ring, view.device
        # no banner, compile line or 'no CUDA driver' warning mid-run (Warp's own log)
        level, wp.config.log_level = wp.config.log_level, wp.LOG_ERROR
        try:
            wp.init()  # once per process
            args = [wp.from_torch(t, requires_grad=False) for t in self._bound]
            args += [flags, wp.from_torch(ring, requires_grad=False), 0,
                     wp.float64(3.0 * KB_EV_PER_K)]
            self._cmd = wp.launch(_system_scalars, dim=view.num_systems, inputs=args,
                                  device=wp.device_from_torch(view.device), record_cmd=True)
        finally:
            wp.config.log_level = level
        self._slot = 0

    def _bind(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        self._cmd.set_param_at_index_from_ctype(i, wp.from_torch(t, return_ctype=True))
        self._bound[i] = t
        self._keys[i] = (t.data_ptr(), t.shape, t.stride())

    def _stream(self, device: torch.device) -> Any:
        cur = torch.cuda.current_stream(device)
        ws = self._streams.get(cur.cuda_stream)
        if ws is None:
            ws = self._streams[cur.cuda_stream] = wp.stream_from_torch(cur)
        return ws

"""Snapshot staging (issue 14): one ``cat`` of every field's bytes per firing, views kept while the
batch keeps its tensors. Recorded bytes are read back with plain zarr and compared with the batch
itself, converted with torch (``.to(recorded dtype)``), for the cases where kept views or host-side
conversion could go wrong: mixed dtypes, non-contiguous and grad-requiring fields, tensors updated
in place, replaced, resized or re-pointed between firings, batch sizes changing, empty batches,
converged masks of any form; and the op count per firing does not grow with the number of fields.
"""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from dist_hooks import ConvergedSnapshotHook, FieldChangedError, SnapshotHook, ZarrSink, packing
from dist_hooks.stages import Stage
from dist_hooks.store import layout

from batches import Ctx, make_batch, make_empty_batch, perturb, with_grad

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
RECORD_KEYS = ("step", "sample_id", "graph_idx", "status")


def group(root, rank=0, name="snapshots"):
    return zarr.open_group(root, mode="r", use_consolidated=False)[layout.hook_group(rank, name)]


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype != np.bool_ else a


def expected(firings, exclude=("batch_ptr", "batch_idx", "system_id", "status")) -> dict[str, np.ndarray]:
    """The columns a snapshot group must hold for ``[(step, {name: tensor}), ...]`` (the batch's
    tensors as they were at the call), computed with torch."""
    cols: dict[str, list] = {}
    for step, t in firings:
        ptr = t["batch_ptr"].reshape(-1).to(torch.int64)
        B = ptr.numel() - 1
        sid = t.get("system_id")
        st = t.get("status")
        rec = {"step": torch.full((B,), step), "graph_idx": torch.arange(B),
               "sample_id": torch.arange(B) if sid is None else first_column(sid),
               "status": torch.zeros(B) if st is None else first_column(st)}
        for k in RECORD_KEYS:
            cols.setdefault(k, []).append(rec[k].to(torch.int64).cpu())
        for name, v in t.items():
            if name in exclude:
                continue
            v = v.detach().to(packing.RECORDED_AS.get(v.dtype, v.dtype)).cpu()
            if v.shape[0] == B and v.dim() == 2 and v.shape[1] == 1:
                v = v.reshape(B)  # a system field's trailing singleton is dropped
            cols.setdefault(name, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def first_column(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)[:, 0] if t.dim() > 1 else t


def assert_columns(g, want: dict[str, np.ndarray]) -> None:
    assert set(want) | {"atoms_ptr"} == set(g.array_keys())
    for k, w in want.items():
        got = g[k][:]
        assert got.dtype == w.dtype and got.shape == w.shape, (k, got.dtype, w.dtype, got.shape, w.shape)
        assert np.array_equal(bits(got), bits(w)), k


def state(b) -> dict[str, torch.Tensor]:
    """The batch's tensors now (clones: what a record of this moment must hold)."""
    return {k: v.detach().clone() for k, v in vars(b).items() if isinstance(v, torch.Tensor)}


def with_extras(counts, seed, device, first_id=0):
    """A batch with fields of every storable kind: float64/int32/bfloat16/float16/int8/uint8/bool,
    special bit patterns, non-contiguous (transposed, column slice, broadcast) fields, an int32
    batch_ptr, a 1-D int32 status and a (B, 2) system_id whose first column is the id."""
    b = make_batch(counts, seed=seed, first_id=first_id, device=device)
    g = torch.Generator().manual_seed(seed + 1000)
    N, B = b.positions.shape[0], len(counts)
    on = lambda t: t.to(device)  # noqa: E731
    b.f64 = on(torch.randn(N, 2, generator=g, dtype=torch.float64))
    b.i32 = on(torch.randint(-2**31, 2**31 - 1, (N,), generator=g, dtype=torch.int32))
    bf = torch.randn(N, 3, generator=g) * 100
    bf[0] = torch.tensor([float("nan"), -0.0, float("inf")])
    b.bf16 = on(bf.to(torch.bfloat16))
    b.half = on(torch.randn(B, generator=g).half())
    b.i8 = on(torch.randint(-128, 127, (B, 4), generator=g, dtype=torch.int8))
    b.u8 = on(torch.randint(0, 255, (N,), generator=g, dtype=torch.uint8))
    b.flag = on(torch.rand(N, generator=g) > 0.5)
    b.tr = on(torch.randn(3, N, generator=g)).T  # (N, 3), transposed
    b.col = on(torch.randn(B, 4, generator=g))[:, 1:3]  # a column slice
    b.bcast = on(torch.randn(1, 2, generator=g)).expand(B, 2)  # stride 0
    b.batch_ptr = b.batch_ptr.to(torch.int32)
    b.status = b.status.reshape(-1).to(torch.int32)
    b.system_id = torch.stack([b.system_id[:, 0], -b.system_id[:, 0]], 1)
    assert not b.tr.is_contiguous() and not b.col.is_contiguous() and not b.bcast.is_contiguous()
    return b


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_noncontiguous_fields_and_changing_batches_record_the_batch_bytes(tmp_path, device):
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16), rank=0)
    a = with_extras([3, 1, 5], seed=1, device=device, first_id=10)
    c = with_extras([2, 7], seed=2, device=device, first_id=50)
    firings = []

    def fire(b, step):
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        if b.positions.shape[0]:
            firings.append((step, state(b)))

    def in_place(b, k):  # what an integrator does: the same tensors, new values
        perturb(b, k)
        b.f64.mul_(-1.5)
        b.i32.add_(7)
        b.bf16.mul_(2)
        b.tr.add_(1.0)  # through the transposed view, into its base
        b.i8.sub_(3)
        b.status.add_(1)

    fire(a, 0)
    in_place(a, 1)
    fire(a, 1)  # kept views: must show the new values
    a.forces = torch.randn_like(a.forces)  # replaced by an equal-layout tensor
    a.tr = torch.randn(3, a.tr.shape[0], device=device).T
    a.system_id = a.system_id + 1000
    fire(a, 2)
    fire(make_empty_batch(device=device), 3)
    fire(c, 4)  # another layout
    in_place(c, 5)
    fire(c, 5)
    in_place(a, 6)
    fire(a, 6)  # back to the first one
    with torch.no_grad():
        a.positions.set_(torch.randn_like(a.positions))  # same object, new storage
    fire(a, 7)
    in_place(a, 8)  # in-place updates after the last call must not leak into it
    hook.close()
    assert_columns(group(tmp_path / "d.zarr"), expected(firings))


def test_without_system_id_or_status_the_writer_fills_in_positions_and_zeros(tmp_path):
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    b = make_batch([2, 3, 1], seed=3, first_id=70)
    del b.system_id, b.status
    firings = []
    for step in range(3):
        perturb(b, step)
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        firings.append((step, state(b)))
    hook.close()
    g = group(tmp_path / "d.zarr")
    assert g["sample_id"][:].tolist() == [0, 1, 2] * 3 and g["status"][:].tolist() == [0] * 9
    assert_columns(g, expected(firings))


def test_a_field_resized_in_place_is_a_schema_change_not_stale_bytes(tmp_path):
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    b = make_batch([2, 3], seed=4)
    b.extra = torch.randn(5, 4)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    b.extra.resize_(5, 2)  # the same tensor object, another shape
    with pytest.raises(FieldChangedError, match=r"'extra'.*\(4,\).*\(2,\)"):
        hook(Ctx(b, step_count=1), Stage.AFTER_STEP)
    hook.close()


@pytest.mark.parametrize("device", DEVICES)
def test_fields_requiring_grad_are_recorded_and_their_graph_is_not_kept(tmp_path, device):
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16), rank=0)
    firings = []
    b = with_grad(make_batch([3, 4, 2], seed=5)).to(device)
    b.nc = (b.positions * 3.0)[:, 1:]  # non-contiguous and requires grad
    for step in range(3):
        assert b.forces.requires_grad and b.nc.requires_grad and not b.nc.is_contiguous()
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        firings.append((step, state(b)))
        with torch.no_grad():
            b.positions.add_(0.5)  # a leaf updated in place, as an optimiser would
    assert b.nc.grad_fn is not None and b.forces.grad_fn is not None  # the caller's graph is intact
    forces = weakref.ref(b.forces)
    b = make_batch([1, 2], seed=6).to(device)  # the engine drops the old batch and its graph
    b.nc = torch.randn(3, 4, device=device)[:, :2]
    hook(Ctx(b, step_count=3), Stage.AFTER_STEP)
    firings.append((3, state(b)))
    gc.collect()
    assert forces() is None  # the hook kept only byte views, not the tensor and its graph
    hook.close()
    assert_columns(group(tmp_path / "d.zarr"), expected(firings))


@pytest.mark.parametrize("device", DEVICES)
def test_converged_masks_of_any_form_select_the_right_systems(tmp_path, device):
    hook = ConvergedSnapshotHook(ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16), rank=0)
    b = make_batch([4, 2, 6, 3, 5], seed=7, device=device)
    B = 5
    masks = {  # step: mask; the batch keeps its tensors, updated in place
        0: torch.zeros(B, dtype=torch.bool),
        1: torch.tensor([False, True, False, False, False]),
        2: torch.tensor([[0], [1], [1], [0], [0]]),  # (B, 1) integers
        3: torch.tensor([[True, False], [True, True], [False, False], [False, True], [False, False]])[:, 0],
        4: torch.tensor([0.0, 0.0, 0.0, float("nan"), 2.0]),  # NaN and 2.0 are True, as .to(bool)
    }
    want = []
    for step, m in masks.items():
        perturb(b, step)
        hook(Ctx(b, step_count=step, converged_mask=m.to(device)), Stage.ON_CONVERGE)
        snap = state(b)
        for g in torch.nonzero(m.reshape(-1).to(torch.bool)).reshape(-1).tolist():
            if g not in [w[1] for w in want]:
                want.append((step, g, snap))
    hook.close()
    g = group(tmp_path / "d.zarr", name="converged")
    got = [(int(s), int(i)) for s, i in zip(g["step"][:], g["sample_id"][:])]
    assert got == [(w[0], w[1]) for w in want] == [(1, 1), (2, 2), (3, 0), (4, 3), (4, 4)]
    ptr = g["atoms_ptr"][:]
    for r, (step, sys, snap) in enumerate(want):
        s, e = int(snap["batch_ptr"][sys]), int(snap["batch_ptr"][sys + 1])
        rec = g["positions"][int(ptr[r]):int(ptr[r + 1])]
        assert np.array_equal(bits(rec), bits(snap["positions"][s:e].cpu().numpy()))
        assert np.array_equal(bits(g["energy"][r:r + 1]), bits(snap["energy"][sys].cpu().numpy()))


# -- structure --------------------------------------------------------------------------------
COPY_OPS = {"aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::index_select"}


def _ops_per_firing(hook, ctxs) -> list[tuple[int, int]]:
    """(top-level aten ops, copying aten ops at any depth) of each firing, on the calling thread."""
    from torch.profiler import ProfilerActivity, profile, record_function
    marks = [f"firing{i}" for i in range(len(ctxs))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for mark, ctx in zip(marks, ctxs):
            with record_function(mark):
                hook(ctx, Stage.AFTER_STEP)
            hook._channel.drain()
    counts = {m: [0, 0] for m in marks}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p, depth = e.cpu_parent, 0
        while p is not None and p.name not in counts:
            p, depth = p.cpu_parent, depth + 1
        if p is not None:
            counts[p.name][0] += depth == 0
            counts[p.name][1] += e.name in COPY_OPS
    return [tuple(counts[m]) for m in marks]


def _plain_batch(n_fields: int, counts, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(counts)
    N, B = int(counts.sum()), counts.numel()
    ptr = torch.zeros(B + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    b = SimpleNamespace(positions=torch.randn(N, 3, generator=g), batch_ptr=ptr)
    for i in range(n_fields - 1):  # atom and system fields of several dtypes
        t = torch.randn((N, 2) if i % 2 else (B, 3), generator=g)
        setattr(b, f"f{i}", t.to([torch.float32, torch.float64, torch.int32, torch.bfloat16][i % 4]))
    return b


def test_ops_per_firing_do_not_grow_with_the_number_of_fields(tmp_path):
    """Structural: one firing's staging is one cat, whatever the number of fields (no timing)."""
    per = {}
    for n_fields in (3, 12):
        hook = SnapshotHook(ZarrSink(tmp_path / f"d{n_fields}.zarr"), rank=0)
        same = _plain_batch(n_fields, [3, 5, 2], seed=1)
        fresh = [_plain_batch(n_fields, c, seed=i) for i, c in enumerate([[4, 1], [2, 2, 2], [7]])]
        for step in range(6):  # warm: buffers allocated, schema and staging made
            hook(SimpleNamespace(batch=same, step_count=step), Stage.AFTER_STEP)
        steady = _ops_per_firing(hook, [SimpleNamespace(batch=same, step_count=10 + i) for i in range(3)])
        changing = _ops_per_firing(hook, [SimpleNamespace(batch=b, step_count=20 + i)
                                          for i, b in enumerate(fresh)])
        hook.close()
        per[n_fields] = steady, changing
        # the same tensors: no per-field op at all; one cat, into the host buffer
        assert all(c == 1 for _, c in steady), steady
        # new tensors (another batch size each firing): views are made anew, still one copy
        assert all(c == 1 for _, c in changing), changing
    assert per[3][0] == per[12][0]  # every aten op of a steady firing, 3 fields or 12


def test_slots_are_naturally_aligned_and_bfloat16_converts_exactly():
    every_bf16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    tensors = {"b": torch.ones(3, dtype=torch.bool), "x": every_bf16,
               "d": torch.randn(5, dtype=torch.float64), "i": torch.arange(3, dtype=torch.int32),
               "c": torch.randn(2, 2, dtype=torch.complex64), "h": torch.randn(7).half()}
    st = packing.Staging(tensors, {k: k for k in tensors}, device=torch.device("cpu"))
    buf = torch.empty(st.nbytes, dtype=torch.uint8)
    torch.cat(st.first, out=buf)
    ends = sorted((s.offset, s.offset + s.nbytes) for s in st.slots)
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == st.nbytes  # no gaps
    cols = packing.unpack(buf, st.slots)
    for s in st.slots:
        assert s.offset % s.dtype.itemsize == 0 and cols[s.name].flags.aligned, s
        want = tensors[s.name].to(s.recorded).numpy()
        assert cols[s.name].dtype == want.dtype and np.array_equal(bits(cols[s.name]), bits(want)), s.name

"""SnapshotHook / ConvergedSnapshotHook: bytes read back from Zarr equal the batch, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_hooks import ConvergedSnapshotHook, FieldChangedError, SnapshotHook, ZarrSink
from dist_hooks.stages import Stage
from dist_hooks.store import GroupReader, layout

from batches import Ctx, make_batch, perturb

ATOM = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses")


def bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of an array, so NaN == NaN and -0.0 != 0.0."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype != np.bool_ else a


def test_snapshots_bit_identical_over_many_appends_and_flushes(tmp_path):
    sink = ZarrSink(tmp_path / "data.zarr", chunk_records=8, chunk_atoms=64, chunks_per_shard=4)
    hook = SnapshotHook(sink, frequency=1, rank=2)
    expected = []
    rng = np.random.default_rng(0)
    for step in range(60):
        counts = rng.integers(1, 20, size=rng.integers(1, 9)).tolist()  # batch shape changes too
        b = make_batch(counts, seed=step, first_id=100 * step)
        if step == 7:
            b.positions[0, 0] = float("nan")
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        expected.append((step, {k: v.clone() for k, v in vars(b).items()}))
        if step % 17 == 5:
            hook.flush()  # flushes at arbitrary points leave partial chunks behind
    hook.close()
    rd = GroupReader(tmp_path / "data.zarr", layout.hook_group(2, "snapshots"))
    assert len(rd) == sum(e[1]["energy"].shape[0] for e in expected)
    i = 0
    for step, ref in expected:
        for g in range(ref["energy"].shape[0]):
            rec = rd.record(i, as_torch=False)
            s, e = int(ref["batch_ptr"][g]), int(ref["batch_ptr"][g + 1])
            assert int(rec["step"]) == step and int(rec["graph_idx"]) == g
            assert int(rec["sample_id"]) == int(ref["system_id"][g, 0])
            assert int(rec["status"]) == int(ref["status"][g, 0])
            for k in ATOM:
                assert np.array_equal(bits(rec[k]), bits(ref[k][s:e].numpy())), (i, k)
            assert np.array_equal(bits(np.asarray(rec["energy"])), bits(ref["energy"][g, 0].numpy()))
            assert np.array_equal(bits(rec["cell"]), bits(ref["cell"][g].numpy()))
            assert np.array_equal(rec["pbc"], ref["pbc"][g].numpy())
            i += 1


def test_in_place_updates_after_the_call_do_not_leak_into_the_record(tmp_path):
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=32)
    hook = SnapshotHook(sink, rank=0)
    b = make_batch([3, 5], seed=1)
    want = b.positions.clone()
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    b.positions.add_(1000.0)  # the integrator's next step, before the writer ran
    hook.close()
    rd = GroupReader(tmp_path / "d.zarr", layout.hook_group(0, "snapshots"))
    assert np.array_equal(rd.column("positions"), want.numpy())


def test_field_shape_change_is_a_clear_error(tmp_path):
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    b = make_batch([2, 3], seed=2)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    b.cell = torch.zeros(2, 9)
    with pytest.raises(FieldChangedError, match=r"'cell'.*\(3, 3\).*\(9,\)"):
        hook(Ctx(b, step_count=1), Stage.AFTER_STEP)
    b2 = make_batch([2, 3], seed=2)
    b2.positions = b2.positions.double()
    with pytest.raises(FieldChangedError, match="positions.*float32.*float64"):
        hook(Ctx(b2, step_count=2), Stage.AFTER_STEP)
    b3 = make_batch([2, 3], seed=2)
    del b3.forces
    with pytest.raises(FieldChangedError, match="forces"):
        hook(Ctx(b3, step_count=3), Stage.AFTER_STEP)
    hook.close()


def test_converged_written_once_per_system(tmp_path):
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=32)
    hook = ConvergedSnapshotHook(sink, rank=1)
    b = make_batch([4, 2, 6, 3, 5], seed=4)
    converged_at = {0: 3, 1: 3, 2: 7, 3: 12, 4: None}
    states = {}
    for step in range(20):
        perturb(b, step)
        mask = torch.tensor([c is not None and step >= c for c in converged_at.values()])
        for g, c in converged_at.items():
            if c == step:
                states[g] = {k: v.clone() for k, v in vars(b).items()}
        if mask.any():  # the engine keeps stepping converged systems and fires ON_CONVERGE again
            hook(Ctx(b, step_count=step, converged_mask=mask), Stage.ON_CONVERGE)
        hook(Ctx(b, step_count=step, converged_mask=mask), Stage.AFTER_STEP)  # other stage: ignored
    hook.close()
    rd = GroupReader(tmp_path / "d.zarr", layout.hook_group(1, "converged"))
    sids = rd.column("sample_id").tolist()
    assert sids == [0, 1, 2, 3]  # each converged system once, in convergence order
    assert rd.column("step").tolist() == [3, 3, 7, 12]
    for i, g in enumerate([0, 1, 2, 3]):
        rec = rd.record(i, as_torch=False)
        ref = states[g]
        s, e = int(ref["batch_ptr"][g]), int(ref["batch_ptr"][g + 1])
        assert np.array_equal(bits(rec["positions"]), bits(ref["positions"][s:e].numpy()))
        assert np.array_equal(bits(np.asarray(rec["energy"])), bits(ref["energy"][g, 0].numpy()))
    # a new hook on the same store (a resumed process) does not write them again
    hook2 = ConvergedSnapshotHook(ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=32), rank=1)
    hook2(Ctx(b, step_count=21, converged_mask=torch.ones(5, dtype=torch.bool)), Stage.ON_CONVERGE)
    hook2.close()
    rd.refresh()
    assert rd.column("sample_id").tolist() == [0, 1, 2, 3, 4]

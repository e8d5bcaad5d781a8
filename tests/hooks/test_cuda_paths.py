"""The CUDA stream path of the hooks (side stream, pinned ring, events), against the same independent
references as the CPU tests. Runs where a CUDA device is present (the GPU machine); CI has none.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from dist_hooks import ConvergedSnapshotHook, LoggingHook, SnapshotHook, ZarrSink
from dist_hooks.stages import Stage
from dist_hooks.store import GroupReader, layout

from batches import Ctx, make_batch, make_empty_batch, perturb, with_dtype, with_grad
from test_logging_hook import compare, read_csv, reference_rows
from test_refusals import assert_group_equals, snapshot_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mode", ["fused", "eager"])
def test_logging_on_cuda_matches_float64_reference(tmp_path, mode):
    """Both reductions on the compute stream, over rings of 4 that alternate (the copy of one
    ring runs while the next is written), once with a batch updated in place (the fused
    launch replayed) and once with a new batch each firing (re-bound)."""
    if mode == "fused":
        pytest.importorskip("warp", reason="carry the warp-lang wheel to the GPU machine")
    for fresh in (False, True):
        hook = LoggingHook(log_path=tmp_path / f"{fresh}.csv", ring_size=4, rank=0, reductions=mode)
        b = make_batch([3, 7, 1, 12, 5], seed=1)
        on_gpu = b.to("cuda")
        want = []
        for step in range(11):
            perturb(b, step)
            want += reference_rows(b, step, 0)
            if fresh:
                on_gpu = b.to("cuda")
            else:
                for name in ("positions", "velocities", "forces", "energy"):
                    getattr(on_gpu, name).copy_(getattr(b, name))
            hook(Ctx(on_gpu, step_count=step), Stage.AFTER_STEP)
        hook.close()
        assert hook.reductions_used == mode
        compare(read_csv(tmp_path / f"{fresh}.rank-00000.csv"), want)


def test_in_place_updates_on_the_compute_stream_do_not_race_the_side_stream(tmp_path):
    """The integrator overwrites positions right after the hook call, on the compute stream; what was
    recorded must be the state at the call, for every one of many back-to-back steps."""
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=64, chunk_atoms=4096)
    hook = SnapshotHook(sink, rank=0)
    log = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    b = make_batch([300] * 8, seed=2).to("cuda")
    want_pos, want_rows = [], []
    for step in range(50):
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        log(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want_pos.append(b.positions.cpu().numpy().copy())
        want_rows += reference_rows(b.to("cpu"), step, 0)
        big = torch.randn(4096, 4096, device="cuda")  # keep the compute stream busy
        for _ in range(3):
            big = big @ big / 64
        b.positions.add_(big[0, 0] * 0 + 1.0)  # in place, queued behind the matmuls
        b.forces.mul_(1.01)
        b.velocities.mul_(0.99)
    hook.close()
    log.close()
    rd = GroupReader(tmp_path / "d.zarr", layout.hook_group(0, "snapshots"))
    assert np.array_equal(rd.column("positions"), np.concatenate(want_pos))
    compare(read_csv(tmp_path / "log.rank-00000.csv"), want_rows)


def test_converged_on_cuda_written_once(tmp_path):
    hook = ConvergedSnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    b = make_batch([4, 2, 6], seed=4).to("cuda")
    for step in range(6):
        mask = torch.tensor([step >= 1, step >= 3, False], device="cuda")
        hook(Ctx(b, step_count=step, converged_mask=mask), Stage.ON_CONVERGE)
    hook.close()
    rd = GroupReader(tmp_path / "d.zarr", layout.hook_group(0, "converged"))
    assert rd.column("sample_id").tolist() == [0, 1] and rd.column("step").tolist() == [1, 3]


def test_bfloat16_grad_and_empty_batches_on_cuda(tmp_path, device="cuda"):
    """The CUDA path stages each field in its recorded dtype (bfloat16 -> float32) under no_grad:
    the same bytes as the CPU path, and empty firings record nothing."""
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16)
    snap = SnapshotHook(sink, rank=0)
    log = LoggingHook(log_path=tmp_path / "log.csv", ring_size=3, rank=0)
    recorded, rows = [], []
    for step in range(8):
        if step % 3 == 1:
            b = make_empty_batch()
        else:
            b = make_batch([3, 1, 5], seed=step, first_id=10 * step)
            b = with_dtype(with_grad(b), torch.bfloat16, ("positions", "velocities"))
            recorded.append((step, b))
            rows += reference_rows(b, step, 0)
        snap(Ctx(b.to(device), step_count=step), Stage.AFTER_STEP)
        log(Ctx(b.to(device), step_count=step), Stage.AFTER_STEP)
    snap.close()
    log.close()
    g = zarr.open_group(tmp_path / "d.zarr", mode="r", use_consolidated=False)[layout.hook_group(0, "snapshots")]
    assert g["positions"].dtype == np.float32
    assert_group_equals(g, snapshot_rows(recorded), atom_dtype=torch.float32)
    compare(read_csv(tmp_path / "log.rank-00000.csv"), rows)

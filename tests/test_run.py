"""``Run`` in one process: what it writes, read back with plain zarr and json."""
from __future__ import annotations

import json

import numpy as np
import torch
import zarr

from batches import Ctx, make_batch, perturb
from consolidated_ref import assert_merged_checksums
from dist_hooks import Run, Stage

OPTIONS = dict(chunk_records=4, chunk_atoms=16, chunks_per_shard=2, compressor="none",
               write_unit="chunk", fsync="never")


def _record(run: Run, steps: int = 12) -> None:
    hooks = [run.snapshot_hook(frequency=3), run.converged_hook(), run]
    b = make_batch([3, 5, 2, 4], seed=1)
    for step in range(steps):
        ctx = Ctx(b, step_count=step)
        run(ctx, Stage.BEFORE_STEP)
        hooks[0](ctx, Stage.AFTER_STEP)
        mask = torch.zeros(4, dtype=torch.bool)
        mask[step % 4] = step >= 4  # one system converges per step from step 4 on
        if mask.any():
            hooks[1](Ctx(b, step_count=step, converged_mask=mask), Stage.ON_CONVERGE)
        perturb(b, step)
    run.close()


def _array_meta(root, group: str, name: str) -> dict:
    return json.loads((root / "data.zarr" / group / name / "zarr.json").read_text())


def test_sink_options_reach_the_merged_group(tmp_path):
    run = Run(tmp_path / "run", checkpoint_every=5, sink_options=OPTIONS, handle_signals=False)
    _record(run)
    root = tmp_path / "run"
    merged = zarr.open_group(str(root / "data.zarr"), path="converged", mode="r",
                             use_consolidated=False)
    assert merged["rank"].shape == (4,)  # each system once
    for group in ("converged", "ranks/rank-00000/converged", "ranks/rank-00000/snapshots"):
        for name, rows in (("step", 4), ("positions", 16)):
            meta = _array_meta(root, group, name)
            sharding = meta["codecs"][0]
            assert sharding["name"] == "sharding_indexed", (group, name)
            assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 2 * rows
            inner = sharding["configuration"]
            assert inner["chunk_shape"][0] == rows, (group, name)
            assert [c["name"] for c in inner["codecs"]] == ["bytes"], (group, name)  # no zstd
    # and what the merged group holds is each rank-0 converged record once, in step order
    conv = zarr.open_group(str(root / "data.zarr"), path="ranks/rank-00000/converged", mode="r",
                           use_consolidated=False)
    np.testing.assert_array_equal(merged["sample_id"][:], conv["sample_id"][:])
    np.testing.assert_array_equal(merged["positions"][:], conv["positions"][:])
    assert_merged_checksums(root)


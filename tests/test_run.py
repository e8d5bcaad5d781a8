"""``Run`` in one process: what it writes, read back with plain zarr and json; what it refuses
(a held directory, damaged committed data, a lost hook, steps going back) and its lifecycle."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from batches import Ctx, make_batch, perturb
from consolidated_ref import assert_merged_checksums
from dist_hooks import ConvergedSnapshotHook, Run, Stage
from dist_hooks.errors import DamageError, LockHeldError, ResumeError, RunError
from dist_hooks.store.manifest import Manifest
from dist_hooks.tools.consolidate import consolidate
from dist_hooks.tools.verify import verify_run

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



# -- refusing what would corrupt a run (issue 12) -------------------------------------------------
def _new_run(path, **kw) -> Run:
    kw.setdefault("checkpoint_every", 5)
    return Run(path, sink_options=OPTIONS, handle_signals=False, **kw)


def _steps(run: Run, hooks: list, start: int, stop: int) -> None:
    """Steps ``[start, stop)`` of a synthetic workload through ``hooks`` and the run itself."""
    b = make_batch([3, 5, 2, 4], seed=1)
    for step in range(start, stop):
        ctx = Ctx(b, step_count=step)
        run(ctx, Stage.BEFORE_STEP)
        for h in hooks:
            if isinstance(h, ConvergedSnapshotHook):
                mask = torch.zeros(4, dtype=torch.bool)
                mask[step % 4] = step >= 4
                if mask.any():
                    h(Ctx(b, step_count=step, converged_mask=mask), Stage.ON_CONVERGE)
            else:
                h(ctx, Stage.AFTER_STEP)
        perturb(b, step)


def _finished_run(path, steps: int = 12) -> dict:
    run = _new_run(path)
    _steps(run, [run.logging_hook(), run.snapshot_hook(frequency=3), run.converged_hook()], 0, steps)
    run.close()
    return json.loads((path / "run.json").read_text())


def test_a_second_run_on_a_held_directory_is_refused_naming_the_holder(tmp_path):
    first = _new_run(tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    manifest = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(LockHeldError) as err:
        _new_run(tmp_path / "run")
    assert f"pid {os.getpid()}" in str(err.value) and "not closed" in str(err.value)
    assert err.value.exit_code == 3
    # refused before touching anything: no file added, the manifest as it was
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert (tmp_path / "run" / "run.json").read_bytes() == manifest
    holder = json.loads((tmp_path / "run" / ".run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["launcher"] == first.launch.launcher
    first.close()
    _new_run(tmp_path / "run").close()  # released at close: the relaunch goes ahead


def test_local_dir_is_locked_too(tmp_path):
    local = tmp_path / "node"
    a = _new_run(tmp_path / "a", storage="local", local_dir=local)
    with pytest.raises(LockHeldError, match="rank-00000.lock"):
        _new_run(tmp_path / "b", storage="local", local_dir=local)
    assert not (tmp_path / "b" / "run.json").exists()
    _new_run(tmp_path / "b").close()  # b's own lock was let go when it was refused
    a.close()


def test_a_filesystem_that_cannot_lock_is_refused_unless_lock_false(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunError, match="'flock' mount option") as err:
        _new_run(tmp_path / "run")
    assert not isinstance(err.value, LockHeldError)
    assert not (tmp_path / "run" / "run.json").exists()
    _new_run(tmp_path / "run", lock=False).close()
    assert (tmp_path / "run" / "run.json").exists()


def test_resume_without_a_committed_hook_is_refused_unless_dropped(tmp_path):
    root = tmp_path / "run"
    m = _finished_run(root)
    committed = m["last"]["ranks"][0]["hooks"]["snapshots"]["records"]
    assert committed > 0
    before = (root / "run.json").read_bytes()
    for name in ("snapshots", "snaps"):  # left out, or renamed
        run = _new_run(root)
        hooks = [run.logging_hook(), run.converged_hook()]
        if name == "snaps":
            hooks.append(run.snapshot_hook(name="snaps", frequency=3))
        with pytest.raises(ResumeError) as err:
            _steps(run, hooks, run.start_step, run.start_step + 3)
        text = str(err.value)
        assert "'snapshots'" in text and f"{committed} records" in text and "drop_hooks" in text
        with pytest.raises(ResumeError):
            run.close()  # refused again, and closed: nothing more happens
        run.close()
        assert (root / "run.json").read_bytes() == before
    # refused at close() too, when no step came first
    run = _new_run(root)
    run.logging_hook(), run.converged_hook()
    with pytest.raises(ResumeError, match="snapshots"):
        run.close()
    assert (root / "run.json").read_bytes() == before
    # dropped on request: recorded in run.json, which old readers still parse
    run = _new_run(root, drop_hooks=("snapshots",))
    _steps(run, [run.logging_hook(), run.converged_hook()], run.start_step, run.start_step + 6)
    run.close()
    m2 = json.loads((root / "run.json").read_text())
    assert "snapshots" not in m2["last"]["ranks"][0]["hooks"]
    assert [d["hook"] for d in m2["dropped"]] == ["snapshots"]
    assert m2["dropped"][0]["ranks"]["0"]["records"] == committed
    assert m2["dropped"][0]["boundary"] == len(m["boundaries"])
    assert list(m2)[-1] == "dropped"  # additive, after every v1 key
    assert Manifest.parse((root / "run.json").read_bytes()).encode() == (root / "run.json").read_bytes()
    # and a later boundary does not list it again
    run = _new_run(root)
    run.logging_hook(), run.converged_hook()
    run.close()
    assert len(json.loads((root / "run.json").read_text())["dropped"]) == 1
    # a recorded drop is no damage: the run verifies, and consolidates without the hook
    report = verify_run(root)
    assert report["ok"], report["problems"]
    assert "snapshots" not in consolidate(root, progress=False)["hooks"]


def test_drop_hooks_naming_a_hook_of_the_run_is_an_error(tmp_path):
    _finished_run(tmp_path / "run")
    run = _new_run(tmp_path / "run", drop_hooks=("log",))
    run.logging_hook(), run.snapshot_hook(frequency=3), run.converged_hook()
    with pytest.raises(RunError, match="drop_hooks names"):
        run.close()


@pytest.mark.parametrize("damage", ["csv byte", "csv cut", "group gone"])
def test_damaged_committed_data_are_refused_when_the_run_starts(tmp_path, damage):
    root = tmp_path / "run"
    m = _finished_run(root)
    hooks = m["last"]["ranks"][0]["hooks"]
    csv = root / hooks["log"]["path"]
    if damage == "csv byte":
        with open(csv, "r+b") as fh:
            fh.seek(hooks["log"]["bytes"] // 2)
            fh.write(b"#")
        where = str(csv)
    elif damage == "csv cut":
        os.truncate(csv, hooks["log"]["bytes"] - 3)
        where = str(csv)
    else:
        shutil.rmtree(root / "data.zarr" / hooks["snapshots"]["group"])
        where = hooks["snapshots"]["group"]
    before = (root / "run.json").read_bytes()
    with pytest.raises(DamageError) as err:
        _new_run(root)  # at start: no hook was added, none fired
    assert where in str(err.value)
    assert (root / "run.json").read_bytes() == before
    _new_run(tmp_path / "other").close()  # nothing held after the refusal
    with pytest.raises(DamageError):
        _new_run(root)  # and the lock of the refused run was let go


def test_step_count_going_backwards_is_refused(tmp_path):
    run = _new_run(tmp_path / "run", checkpoint_every=None)
    b = make_batch([3, 5], seed=1)
    run(Ctx(b, step_count=4), Stage.BEFORE_STEP)
    run(Ctx(b, step_count=4), Stage.BEFORE_STEP)  # the same step again is no step back
    with pytest.raises(RunError, match="went back from 4 to 3"):
        run(Ctx(b, step_count=3), Stage.BEFORE_STEP)
    run(Ctx(b, step_count=5), Stage.BEFORE_STEP)
    run.close()
    resumed = _new_run(tmp_path / "run", checkpoint_every=None)
    assert resumed.start_step == 6
    with pytest.raises(ResumeError, match="resumed at step 6"):
        resumed(Ctx(b, step_count=0), Stage.BEFORE_STEP)
    resumed(Ctx(b, step_count=6), Stage.BEFORE_STEP)
    resumed.close()


def test_lifecycle_calls_are_idempotent_in_any_order(tmp_path):
    root = tmp_path / "run"
    run = _new_run(root)
    hooks = [run.logging_hook(), run.snapshot_hook(frequency=3)]
    _steps(run, hooks, 0, 7)
    run.flush()
    run.flush()
    lengths = run.sync()
    assert lengths["log"]["rows"] == 7 * 4 and run.sync()["log"] == lengths["log"]
    summary = run.checkpoint(7)
    run.close()
    after_close = (root / "run.json").read_bytes()
    for call in (run.close, run.flush, run.sync, run.checkpoint, lambda: run.checkpoint(9),
                 lambda: run.__exit__(None, None, None), lambda: run.__exit__(ValueError,
                                                                              ValueError(), None)):
        call()
    assert run.checkpoint() == {**summary, "index": summary["index"] + 1, "all_final": True}
    assert run.sync() == {}
    assert (root / "run.json").read_bytes() == after_close
    # an error in the with-block: no final boundary, then every call is a no-op too
    with pytest.raises(KeyError):
        with _new_run(root) as again:
            again.logging_hook(), again.snapshot_hook(frequency=3)
            raise KeyError("boom")
    for call in (again.close, again.flush, again.sync, again.checkpoint,
                 lambda: again.__exit__(None, None, None)):
        call()
    assert (root / "run.json").read_bytes() == after_close
    with _new_run(root) as last:  # and no lock is left behind by any of them
        last.logging_hook(), last.snapshot_hook(frequency=3)
    assert len(json.loads((root / "run.json").read_text())["boundaries"]) == summary["index"] + 3


def test_damaged_finished_demo_relaunches_with_an_error_and_commits_nothing(tmp_path):
    out = tmp_path / "demo"
    demo = [sys.executable, "-m", "dist_hooks.demo", "--out", str(out), "--steps", "40",
            "--systems-per-rank", "3", "--max-atoms", "12", "--checkpoint-every", "10", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    first = subprocess.run(demo, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    m = json.loads((out / "run.json").read_text())
    assert m["last"]["all_final"]
    log = m["last"]["ranks"][0]["hooks"]["log"]
    with open(out / log["path"], "r+b") as fh:  # a byte of the committed log, changed
        fh.seek(log["bytes"] // 3)
        fh.write(b"#")
    before = (out / "run.json").read_bytes()
    again = subprocess.run(demo, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0
    assert "DamageError" in again.stderr and log["path"] in again.stderr, again.stderr[-2000:]
    assert (out / "run.json").read_bytes() == before


def test_a_hook_writing_outside_the_run_is_refused(tmp_path):
    """A CSV log outside the run would be named by an absolute path in run.json, which no
    reader may follow: refused when the hook joins, with the path named."""
    from dist_hooks import LoggingHook
    run = _new_run(tmp_path / "run")
    outside = LoggingHook(log_path=tmp_path / "elsewhere", name="mine")
    with pytest.raises(RunError, match="elsewhere.*outside"):
        run.add_hook(outside)
    inside = run.add_hook(LoggingHook(log_path=tmp_path / "run" / "logs" / "mine", name="mine"))
    custom = run.add_hook(LoggingHook(backend="custom", writer_fn=lambda step, rows: None,
                                      log_path=tmp_path / "elsewhere", name="other"))
    _steps(run, [inside, custom], 0, 6)
    run.close()
    m = json.loads((tmp_path / "run" / "run.json").read_text())
    assert m["last"]["ranks"][0]["hooks"]["mine"]["path"] == "logs/mine/rank-00000.csv"
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())

"""LoggingHook's TensorBoard backend, read back with TensorBoard's own EventAccumulator: tags by
sample id (stable when systems are replaced), mean/min/max over the systems, per_system off."""
from __future__ import annotations

import copy
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_hooks.hooks import LoggingHook
from dist_hooks.stages import Stage

from batches import Ctx, make_batch, perturb
from test_logging_hook import reference_rows

NAMES = ("energy", "fmax", "temperature")


def record(tmp_path, batches, **kw):
    """Fire once per (step, batch); the reference rows of each step."""
    hook = LoggingHook(backend="tensorboard", log_path=tmp_path / "tb", ring_size=2, rank=5, **kw)
    want = {}
    for step, b in batches:
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want[step] = reference_rows(b, step, 5)
    hook.close()
    return EventAccumulator(str(tmp_path / "tb" / "rank-00005"), size_guidance={"scalars": 0}).Reload(), want


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tags_by_sample_id_and_summaries(tmp_path):
    b = make_batch([2, 3, 4], seed=9, first_id=100)
    batches = []
    for step in range(3):
        perturb(b, step)
        batches.append((step, copy.deepcopy(b)))
    # step 3: system 101 was replaced by sample 200 at the same batch position (1)
    b3 = make_batch([2, 3, 4], seed=10, first_id=100)
    b3.system_id[1, 0] = 200
    b3.energy[2, 0] = float("nan")  # a diverged system: the summaries use the finite values
    batches.append((3, b3))
    acc, want = record(tmp_path, batches)
    tags = set(acc.Tags()["scalars"])
    assert not any("graph_" in t for t in tags)
    for name in NAMES:
        assert {f"{name}/{s}" for s in ("mean", "min", "max")} <= tags
        assert {f"{name}/sample_{i}" for i in (100, 101, 102, 200)} <= tags
        for sid in (100, 101, 102, 200):
            got = scalars(acc, f"{name}/sample_{sid}")
            ref = {step: r[name] for step, rows in want.items() for r in rows
                   if r["sample_id"] == sid}
            assert sorted(got) == sorted(ref)  # 101 until step 2, 200 from step 3 only
            for step, v in ref.items():
                if math.isnan(v):
                    assert math.isnan(got[step])
                else:
                    assert got[step] == pytest.approx(v, rel=1e-6)
        for step, rows in want.items():
            vals = [r[name] for r in rows if math.isfinite(r[name])]
            assert scalars(acc, f"{name}/mean")[step] == pytest.approx(sum(vals) / len(vals), rel=1e-6)
            assert scalars(acc, f"{name}/min")[step] == pytest.approx(min(vals), rel=1e-6)
            assert scalars(acc, f"{name}/max")[step] == pytest.approx(max(vals), rel=1e-6)
    assert len(want[3]) == 3 and sorted(scalars(acc, "energy/mean")) == [0, 1, 2, 3]


def test_per_system_off_and_default_limit(tmp_path):
    small = make_batch([2, 3], seed=11)
    acc, want = record(tmp_path / "off", [(0, small), (1, small)], per_system=False)
    assert set(acc.Tags()["scalars"]) == {f"{n}/{s}" for n in NAMES for s in ("mean", "min", "max")}
    assert scalars(acc, "fmax/max")[1] == pytest.approx(max(r["fmax"] for r in want[1]), rel=1e-6)
    big = make_batch([1] * 65, seed=12)  # over the default's 64 systems: summaries only
    acc, _ = record(tmp_path / "big", [(0, big)])
    assert not any("/sample_" in t for t in acc.Tags()["scalars"])
    acc, _ = record(tmp_path / "on", [(0, big)], per_system=True)
    assert sum("energy/sample_" in t for t in acc.Tags()["scalars"]) == 65


def cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    from dist_hooks.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_run_with_a_tensorboard_log_in_info_verify_and_plot(tmp_path):
    import json

    from dist_hooks import Run

    run_dir = tmp_path / "run"
    run = Run(run_dir, checkpoint_every=4, handle_signals=False)
    hooks = [run.logging_hook("tb", backend="tensorboard", ring_size=2), run.logging_hook("log")]
    b = make_batch([2, 3], seed=13, first_id=7)
    for step in range(10):
        ctx = Ctx(b, step_count=step)
        run(ctx, Stage.BEFORE_STEP)
        for h in hooks:
            h(ctx, Stage.AFTER_STEP)
        perturb(b, step)
    run.close()
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["hooks"]["tb"] == {"type": "LoggingHook", "frequency": 1, "stage": "AFTER_STEP",
                                  "backend": "tensorboard"}
    assert doc["hooks"]["log"]["backend"] == "csv"
    acc = EventAccumulator(str(run_dir / "logs" / "tb" / "rank-00000")).Reload()
    assert sorted(scalars(acc, "energy/sample_8")) == list(range(10))

    rc, out, _ = cli("info", run_dir, "--json", "--no-disk")
    assert rc == 0
    info = json.loads(out)
    assert info["hooks"]["tb"]["backend"] == "tensorboard"
    assert info["hooks"]["tb"]["log_dir"] == "logs/tb"
    rc, out, _ = cli("info", run_dir)
    line = next(s for s in out.splitlines() if s.startswith("tb "))
    assert "LoggingHook" in line and "TensorBoard events" in line and "logs/tb/rank-*" in line

    rc, out, _ = cli("verify", run_dir)
    assert rc == 0, out
    assert "note: hook 'tb' logs to TensorBoard events: no committed length or checksum" in out

    rc, out, err = cli("plot", run_dir, "--hook", "tb", "--out", tmp_path / "tb.png")
    assert rc == 2 and not (tmp_path / "tb.png").exists()
    assert "TensorBoard log" in err and len(err.strip().splitlines()) == 1, err

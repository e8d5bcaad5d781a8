"""LoggingHook: CSV values against an independent float64 reference, bad input, errors, bounds."""
from __future__ import annotations

import csv
import math
import os
import time

import pytest
import torch

from dist_hooks.hooks import KB_EV_PER_K, LoggingHook
from dist_hooks.writer_runtime import RecorderError
from dist_hooks.stages import Stage

from batches import Ctx, make_batch, perturb


def reference_rows(b, step, rank, custom=None):
    """Per-system values computed one system at a time in float64 (independent of the hook's code)."""
    rows = []
    ptr = b.batch_ptr.tolist()
    for g in range(len(ptr) - 1):
        s, e = ptr[g], ptr[g + 1]
        f = b.forces[s:e].double()
        v = b.velocities[s:e].double()
        m = b.atomic_masses[s:e].double()
        ke = 0.5 * float((m[:, None] * v * v).sum())
        row = {"step": step, "rank": rank, "sample_id": int(b.system_id[g, 0]), "graph_idx": g,
               "status": int(b.status[g, 0]), "energy": float(b.energy[g, 0]),
               "fmax": max(math.sqrt(float((fi * fi).sum())) for fi in f),
               "temperature": 2 * ke / (3 * (e - s) * KB_EV_PER_K)}
        for name, fn in (custom or {}).items():
            val = fn(b, None)
            row[name] = float(val[g]) if isinstance(val, torch.Tensor) else float(val)
        rows.append(row)
    return rows


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def compare(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k, v in w.items():
            if isinstance(v, int):
                assert g[k] == str(v), (k, g[k], v)  # integers written as integers
            else:
                assert float(g[k]) == pytest.approx(v, rel=1e-6, abs=1e-9), (k, g, w)


def test_csv_values_match_float64_reference(tmp_path):
    custom = {"max_x": lambda b, dyn: torch.zeros(b.num_graphs).scatter_reduce(
        0, b.batch_idx, b.positions[:, 0].float(), "amax", include_self=False), "const": lambda b, dyn: 2.5}
    hook = LoggingHook(log_path=tmp_path / "log.csv", custom_scalars=custom, ring_size=4, rank=3)
    b = make_batch([3, 7, 1, 12, 5], seed=1)
    want = []
    for step in range(11):  # 11 firings over a ring of 4: two full rings and a partial one at close
        perturb(b, step)
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want += reference_rows(b, step, 3, custom)
    hook.close()
    path = tmp_path / "log.rank-00003.csv"
    got = read_csv(path)
    assert list(got[0]) == ["step", "rank", "sample_id", "graph_idx", "status", "energy", "fmax",
                            "temperature", "max_x", "const"]
    compare(got, want)


def test_frequency_stage_and_unknown_stage(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "d", frequency=3, rank=0)
    b = make_batch([2, 4], seed=2)
    for step in range(10):
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        hook(Ctx(b, step_count=step), Stage.BEFORE_STEP)  # other stage: ignored
        hook(Ctx(b, step_count=step), "ON_ADMISSION")  # a stage we do not know: ignored
    hook.close()
    rows = read_csv(tmp_path / "d" / "rank-00000.csv")
    assert sorted({int(r["step"]) for r in rows}) == [0, 3, 6, 9]
    assert len(rows) == 8


def test_missing_fields_leave_columns_empty(tmp_path, caplog):
    b = make_batch([2, 3], seed=3)
    del b.forces  # no forces: fmax empty; everything else still logged
    b.__dict__.pop("velocities")
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    with caplog.at_level("WARNING", logger="dist_hooks"):
        for step in range(3):
            hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        hook.close()
    rows = read_csv(tmp_path / "log.rank-00000.csv")
    assert len(rows) == 6
    assert all(r["fmax"] == "" and r["temperature"] == "" for r in rows)
    assert float(rows[0]["energy"]) == pytest.approx(float(b.energy[0, 0]))
    assert sum("no forces" in m for m in caplog.messages) == 1  # said once, not every step


def test_nan_and_inf_recorded_as_they_are(tmp_path):
    b = make_batch([2, 2], seed=4)
    b.energy[0, 0] = float("nan")
    b.energy[1, 0] = float("inf")
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    rows = read_csv(tmp_path / "log.rank-00000.csv")
    assert math.isnan(float(rows[0]["energy"])) and float(rows[1]["energy"]) == math.inf


def test_custom_scalar_added_later_is_an_error(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    b = make_batch([2, 2], seed=5)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.custom_scalars["late"] = lambda b, d: 1.0
    with pytest.raises(ValueError, match="late"):
        hook(Ctx(b, step_count=1), Stage.AFTER_STEP)
    hook.custom_scalars.pop("late")
    hook.close()
    assert len(read_csv(tmp_path / "log.rank-00000.csv")) == 2


def test_batch_size_change_keeps_rows(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "log.csv", ring_size=8, rank=0)
    want = []
    for step, counts in enumerate([[2, 3], [2, 3], [4, 1, 1], [5], [2, 3]]):
        b = make_batch(counts, seed=step, first_id=10 * step)
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want += reference_rows(b, step, 0)
    hook.close()
    compare(read_csv(tmp_path / "log.rank-00000.csv"), want)


def test_unwritable_log_path_fails_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            # root ignores permission bits: a path under a regular file cannot be created by anybody
            (tmp_path / "file").write_text("x")
            target = tmp_path / "file" / "logs" / "log.csv"
        else:
            target = ro / "logs" / "log.csv"
        with pytest.raises(PermissionError, match="logs"):
            LoggingHook(log_path=target)
    finally:
        ro.chmod(0o700)
    made = tmp_path / "new" / "deep"
    LoggingHook(log_path=made / "log.csv")
    assert made.is_dir()


def test_writer_error_surfaces_in_caller():
    def bad_writer(step, rows):
        raise OSError("disk on fire")

    hook = LoggingHook(backend="custom", writer_fn=bad_writer, ring_size=1, rank=0)
    b = make_batch([2, 2], seed=6)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    with pytest.raises(RecorderError, match="disk on fire"):
        for step in range(1, 50):
            hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
            time.sleep(0.01)
    with pytest.raises(RecorderError, match="disk on fire"):
        hook.flush()


def test_custom_backend_rows_and_columnar():
    seen, cols_seen = [], []
    b = make_batch([3, 2], seed=7)
    h1 = LoggingHook(backend="custom", writer_fn=lambda s, rows: seen.append((s, rows)), ring_size=2, rank=1)
    h2 = LoggingHook(backend="custom", writer_fn=lambda s, c: cols_seen.append((s, c)), columnar=True, rank=1)
    for step in range(3):
        h1(Ctx(b, step_count=step), Stage.AFTER_STEP)
        h2(Ctx(b, step_count=step), Stage.AFTER_STEP)
    h1.close(); h2.close()
    ref = reference_rows(b, 0, 1)
    assert [s for s, _ in seen] == [0, 1, 2]
    assert seen[0][1][1]["sample_id"] == ref[1]["sample_id"]
    assert seen[0][1][1]["fmax"] == pytest.approx(ref[1]["fmax"])
    assert cols_seen[2][1]["temperature"] == pytest.approx([r["temperature"] for r in ref])


def test_memory_bounded_under_slow_writer():
    """A writer slower than the simulation must throttle the caller, not buffer without limit."""
    calls = []
    in_flight_max = [0]

    def slow(step, cols):
        time.sleep(0.02)
        calls.append(step)

    hook = LoggingHook(backend="custom", writer_fn=slow, columnar=True, ring_size=1, buffers=3, rank=0)
    b = make_batch([4] * 8, seed=8)
    for step in range(60):
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        in_flight_max[0] = max(in_flight_max[0], hook._channel.pending)
    hook.close()
    assert calls == list(range(60))  # nothing lost, in order
    assert hook._pool.allocations <= 3  # host buffers reused, never more than the pool holds
    # back-pressure: at most `buffers` blocks hold memory at once; the job counter may lag by the one
    # job that has already handed its buffer back but not yet reported itself done
    assert in_flight_max[0] <= 3 + 1


def test_writer_fn_without_the_custom_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="writer_fn is only called with backend='custom'"):
        LoggingHook(log_path=tmp_path / "log", writer_fn=lambda step, rows: None)
    with pytest.raises(ValueError, match="backend='custom' needs writer_fn"):
        LoggingHook(backend="custom")


def test_the_warning_names_exactly_what_the_batch_lacks(tmp_path, caplog):
    """Masses but no velocities: the temperature column is empty, and the warning says it is the
    velocities that are missing (not "velocities and atomic_masses")."""
    from types import SimpleNamespace
    full = make_batch([3, 2], seed=4)
    batch = SimpleNamespace(**{k: v for k, v in vars(full).items() if k != "velocities"})
    batch.num_graphs = full.num_graphs
    hook = LoggingHook(log_path=tmp_path / "log", rank=0)
    with caplog.at_level("WARNING", logger="dist_hooks"):
        hook(Ctx(batch, step_count=0), Stage.AFTER_STEP)
        hook.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("batch has no velocities: column 'temperature' is left empty" in m for m in msgs), msgs
    assert not any("atomic_masses" in m for m in msgs), msgs
    rows = list(csv.DictReader(open(tmp_path / "log" / "rank-00000.csv")))
    assert len(rows) == 2 and all(r["temperature"] == "" for r in rows)
    assert all(r["fmax"] != "" for r in rows)

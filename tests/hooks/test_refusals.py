"""What the hooks refuse, and the awkward batches they record right (issue 12): fields named like
the format's own columns or unusable as Zarr keys, unstorable and integer dtypes, tensors that
require grad, empty batches, bfloat16, and flush/sync/close in any order.

Everything is read back with plain zarr and pandas and compared against the batch itself (or
``test_logging_hook.reference_rows``, computed one system at a time in float64)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from dist_hooks import ConvergedSnapshotHook, LoggingHook, Run, SnapshotHook, ZarrSink
from dist_hooks.comm import SingleCommunicator
from dist_hooks.stages import Stage
from dist_hooks.store import layout
from dist_hooks.store.csv_log import INT_COLUMNS

from batches import Ctx, make_batch, make_empty_batch, perturb, with_dtype, with_grad
from test_logging_hook import compare, read_csv, reference_rows

ATOM = ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses")


def group(root, rank, name):
    """A rank's record group, opened with plain zarr (no dist_hooks reader)."""
    return zarr.open_group(root, mode="r", use_consolidated=False)[layout.hook_group(rank, name)]


def snapshot_rows(batches):
    """The records a snapshot hook must hold for ``[(step, batch), ...]``, one dict per system."""
    out = []
    for step, b in batches:
        ptr = b.batch_ptr.tolist()
        for g in range(len(ptr) - 1):
            s, e = ptr[g], ptr[g + 1]
            out.append({"step": step, "sample_id": int(b.system_id[g, 0]), "graph_idx": g,
                        "status": int(b.status[g, 0]), "energy": b.energy[g, 0].detach().float().numpy(),
                        **{k: getattr(b, k)[s:e].detach() for k in ATOM}})
    return out


def assert_group_equals(g, want, *, atom_dtype=None):
    ptr = g["atoms_ptr"][:]
    assert g["step"].shape[0] == len(want) == ptr.shape[0] - 1
    for r, w in enumerate(want):
        for k in ("step", "sample_id", "graph_idx", "status"):
            assert int(g[k][r]) == w[k], (r, k)
        assert np.array_equal(np.float32(g["energy"][r]), w["energy"])
        s, e = int(ptr[r]), int(ptr[r + 1])
        for k in ATOM:
            ref = w[k]
            if atom_dtype is not None and ref.is_floating_point():
                ref = ref.to(atom_dtype)
            assert np.array_equal(g[k][s:e], ref.numpy()), (r, k)


# -- names ----------------------------------------------------------------------------------------
def test_reserved_names_cover_every_key_column():
    assert set(INT_COLUMNS) <= layout.RESERVED_NAMES
    assert {"step", "sample_id", "graph_idx", "status", "rank", "atoms_ptr", "atoms_start",
            "n_atoms"} <= layout.RESERVED_NAMES


@pytest.mark.parametrize("name", ["step", "sample_id", "rank", "atoms_ptr", "atoms_start", "n_atoms"])
@pytest.mark.parametrize("level", ["record", "atom"])
def test_batch_field_named_like_a_key_column_is_refused_at_the_first_call(tmp_path, name, level):
    b = make_batch([2, 3, 4], seed=1)
    setattr(b, name, torch.full((3,) if level == "record" else (9,), 7, dtype=torch.int64))
    sink = ZarrSink(tmp_path / "d.zarr")
    hook = SnapshotHook(sink, rank=0)
    with pytest.raises(ValueError, match=rf"batch field '{name}' \({level} level\).*exclude"):
        hook(Ctx(b, step_count=3), Stage.AFTER_STEP)
    hook.close()
    assert not (tmp_path / "d.zarr" / layout.hook_group(0, "snapshots")).exists()  # nothing written
    # left out on request, the run records, and the key columns are the hook's own
    hook = SnapshotHook(ZarrSink(tmp_path / "e.zarr"), rank=0, exclude=(name,))
    hook(Ctx(b, step_count=3), Stage.AFTER_STEP)
    hook.close()
    g = group(tmp_path / "e.zarr", 0, "snapshots")
    assert name in layout.RECORD_KEYS or name not in g.attrs["level"]
    assert_group_equals(g, snapshot_rows([(3, b)]))


def test_status_system_id_and_graph_idx_fields_are_not_collisions(tmp_path):
    """status and system_id are meant to become the status and sample_id columns; a batch's
    graph_idx is a pointer tensor, never recorded as a field: none of them is refused."""
    b = make_batch([2, 3, 4], seed=2, first_id=40)
    b.graph_idx = torch.full((3,), 99)
    hook = ConvergedSnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    hook(Ctx(b, step_count=5, converged_mask=torch.ones(3, dtype=torch.bool)), Stage.ON_CONVERGE)
    hook.close()
    g = group(tmp_path / "d.zarr", 0, "converged")
    assert g["sample_id"][:].tolist() == [40, 41, 42] and g["graph_idx"][:].tolist() == [0, 1, 2]
    assert g["status"][:].tolist() == b.status.reshape(-1).tolist()
    assert "system_id" not in g.attrs["level"]


@pytest.mark.parametrize("name", ["a/b", "a\\b", ".", "..", ".hidden", "zarr.json", "nul\0x", ""])
def test_field_names_that_are_not_zarr_keys_are_refused(tmp_path, name):
    b = make_batch([2, 3], seed=3)
    setattr(b, name, torch.ones(2))
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    with pytest.raises(ValueError) as exc:
        hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    assert f"batch field {name!r} (record level) cannot be a Zarr array name" in str(exc.value)
    hook.close()
    assert not (tmp_path / "d.zarr" / "ranks").exists()


@pytest.mark.parametrize("name", ["step", "rank", "sample_id", "graph_idx", "status", "atoms_ptr",
                                  "a,b", 'say "x"', "two\nlines", ""])
def test_custom_scalar_with_a_key_column_name_or_unsafe_characters_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="custom scalar"):
        LoggingHook(log_path=tmp_path / "log.csv", custom_scalars={name: lambda b, d: 1.0}, rank=0)


def test_custom_scalar_named_like_a_default_still_overrides_it(tmp_path):
    hook = LoggingHook(log_path=tmp_path / "log.csv", custom_scalars={"energy": lambda b, d: 4.5}, rank=0)
    b = make_batch([2, 3], seed=4)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    df = pd.read_csv(tmp_path / "log.rank-00000.csv")
    assert list(df.columns) == [*INT_COLUMNS, "energy", "fmax", "temperature"]
    assert df["energy"].tolist() == [4.5, 4.5]


# -- dtypes ---------------------------------------------------------------------------------------
def test_bfloat16_fields_are_recorded_as_float32_and_float16_as_itself(tmp_path):
    batches, want_rows = [], []
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16)
    snap = SnapshotHook(sink, rank=0)
    log = LoggingHook(log_path=tmp_path / "log.csv", ring_size=3, rank=0)
    for step in range(7):
        b = with_dtype(make_batch([3, 1, 5], seed=step, first_id=10 * step), torch.bfloat16)
        b.charges = torch.randn(9).to(torch.float16)
        snap(Ctx(b, step_count=step), Stage.AFTER_STEP)
        log(Ctx(b, step_count=step), Stage.AFTER_STEP)
        batches.append((step, b))
        want_rows += reference_rows(b, step, 0)
    snap.close()
    log.close()
    g = group(tmp_path / "d.zarr", 0, "snapshots")
    for k in ("positions", "velocities", "forces", "energy"):
        assert g[k].dtype == np.float32, k
    assert g["charges"].dtype == np.float16
    assert np.array_equal(g["charges"][:], np.concatenate([b.charges.numpy() for _, b in batches]))
    assert_group_equals(g, snapshot_rows(batches), atom_dtype=torch.float32)  # bf16 -> f32 is exact
    compare(read_csv(tmp_path / "log.rank-00000.csv"), want_rows)


def test_unstorable_dtype_is_refused_at_the_first_call_naming_the_field(tmp_path):
    b = make_batch([2, 3], seed=5)
    b.spins = torch.zeros(5).to(torch.float8_e4m3fn)
    hook = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    with pytest.raises(ValueError, match=r"batch field 'spins' \(atom level\) has dtype torch.float8_e4m3fn"):
        hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    assert not (tmp_path / "d.zarr" / "ranks").exists()


@pytest.mark.parametrize("field", ["velocities", "forces", "atomic_masses"])
def test_integer_field_a_reduction_needs_is_refused_naming_it(tmp_path, field):
    b = make_batch([2, 3], seed=6)
    setattr(b, field, getattr(b, field).to(torch.int64))
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    with pytest.raises(ValueError, match=rf"batch field '{field}' is torch.int64"):
        hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    assert not (tmp_path / "log.rank-00000.csv").exists()
    # a custom scalar in place of the default that needs it: recorded
    scalar = "fmax" if field == "forces" else "temperature"
    hook = LoggingHook(log_path=tmp_path / "b.csv", custom_scalars={scalar: lambda b, d: 1.0}, rank=0)
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    assert pd.read_csv(tmp_path / "b.rank-00000.csv")[scalar].tolist() == [1.0, 1.0]


# -- grad -----------------------------------------------------------------------------------------
def test_tensors_that_require_grad_are_recorded_without_keeping_the_graph(tmp_path):
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16)
    snap = SnapshotHook(sink, rank=0)
    custom = {"e2": lambda b, d: b.energy.reshape(-1) * 2}  # returns a tensor that requires grad
    log = LoggingHook(log_path=tmp_path / "log.csv", ring_size=2, rank=0, custom_scalars=custom)
    batches, want = [], []
    for step in range(5):
        b = with_grad(make_batch([3, 4, 2], seed=step))
        assert b.energy.requires_grad and b.forces.requires_grad and b.positions.requires_grad
        snap(Ctx(b, step_count=step), Stage.AFTER_STEP)
        log(Ctx(b, step_count=step), Stage.AFTER_STEP)
        assert not log._ring.requires_grad and log._ring.grad_fn is None  # no graph kept
        batches.append((step, b))
        want += reference_rows(b, step, 0, {"e2": lambda b, d: (b.energy.reshape(-1) * 2).detach()})
    snap.close()
    log.close()
    assert_group_equals(group(tmp_path / "d.zarr", 0, "snapshots"), snapshot_rows(batches))
    compare(read_csv(tmp_path / "log.rank-00000.csv"), want)


def test_a_custom_scalar_runs_in_the_callers_grad_mode(tmp_path):
    """A custom scalar may differentiate (e.g. a force norm from the model's energy): it is not
    run under the hook's no_grad."""
    def grad_norm(b, dyn):
        (g,) = torch.autograd.grad(b.energy.sum(), b.positions, retain_graph=True)
        return torch.zeros(b.num_graphs).index_add(0, b.batch_idx, (g * g).sum(1))

    b = with_grad(make_batch([3, 2], seed=7))
    hook = LoggingHook(log_path=tmp_path / "log.csv", rank=0, custom_scalars={"g2": grad_norm})
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    hook.close()
    want = reference_rows(b, 0, 0, {"g2": lambda b, d: grad_norm(b, d).detach()})
    compare(read_csv(tmp_path / "log.rank-00000.csv"), want)


# -- empty batches --------------------------------------------------------------------------------
def test_empty_batches_record_nothing_and_later_batches_record_normally(tmp_path):
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16)
    snap = SnapshotHook(sink, rank=0)
    conv = ConvergedSnapshotHook(sink, rank=0)
    log = LoggingHook(log_path=tmp_path / "log.csv", ring_size=3, rank=0)
    seq = [[], [2, 3], [], [], [4], [1, 1, 2], []]  # the first firing is empty too
    recorded, rows, converged = [], [], []
    for step, counts in enumerate(seq):
        b = make_empty_batch() if not counts else make_batch(counts, seed=step, first_id=10 * step)
        b.dipole_x = torch.randn(len(counts))  # a field known only by its leading dimension
        mask = torch.ones(len(counts), dtype=torch.bool)
        for hook, st in ((snap, Stage.AFTER_STEP), (log, Stage.AFTER_STEP), (conv, Stage.ON_CONVERGE)):
            hook(Ctx(b, step_count=step, converged_mask=mask), st)
        if counts:
            recorded.append((step, b))
            rows += reference_rows(b, step, 0)
            converged.append((step, b))
    for hook in (snap, conv, log):
        hook.close()
    g = group(tmp_path / "d.zarr", 0, "snapshots")
    assert_group_equals(g, snapshot_rows(recorded))
    assert np.array_equal(g["dipole_x"][:], np.concatenate([b.dipole_x.numpy() for _, b in recorded]))
    assert_group_equals(group(tmp_path / "d.zarr", 0, "converged"), snapshot_rows(converged))
    compare(read_csv(tmp_path / "log.rank-00000.csv"), rows)


def test_only_empty_batches_leave_nothing_behind(tmp_path):
    snap = SnapshotHook(ZarrSink(tmp_path / "d.zarr"), rank=0)
    log = LoggingHook(log_path=tmp_path / "log.csv", rank=0)
    for step in range(3):
        snap(Ctx(make_empty_batch(), step_count=step), Stage.AFTER_STEP)
        log(Ctx(make_empty_batch(), step_count=step), Stage.AFTER_STEP)
    assert snap.sync() == {} and log.sync() == {}  # never started
    snap.close()
    log.close()
    assert not (tmp_path / "log.rank-00000.csv").exists() and not (tmp_path / "d.zarr" / "ranks").exists()


# -- lifecycle ------------------------------------------------------------------------------------
def _hooks(tmp_path):
    sink = ZarrSink(tmp_path / "d.zarr", chunk_records=4, chunk_atoms=16)
    return [(LoggingHook(log_path=tmp_path / "log.csv", ring_size=8, rank=0), Stage.AFTER_STEP),
            (SnapshotHook(sink, rank=0), Stage.AFTER_STEP), (ConvergedSnapshotHook(sink, rank=0), Stage.ON_CONVERGE)]


@pytest.mark.parametrize("order", [("close", "flush", "sync", "close", "exit"),
                                   ("exit", "sync", "flush", "close"),
                                   ("sync", "close", "sync", "flush", "exit", "close")])
def test_flush_sync_close_exit_in_any_order_are_safe_and_idempotent(tmp_path, order):
    for hook, stage in _hooks(tmp_path):
        b = make_batch([2, 3], seed=8)
        for step in range(5):
            perturb(b, step)
            hook(Ctx(b, step_count=step, converged_mask=torch.tensor([True, step > 2])), stage)
        results = []
        for call in order:
            r = hook.__exit__(None, None, None) if call == "exit" else getattr(hook, call)()
            if call == "sync":
                results.append(r)
        final = hook.sync()  # after close: what the close made durable
        assert all(r == final for r in results[1:]) or order[0] == "sync"
        if hook.commit_kind == "csv":
            assert final["bytes"] == os.path.getsize(final["path"]) and final["rows"] == 10
        else:
            g = zarr.open_group(tmp_path / "d.zarr", mode="r", use_consolidated=False)[final["group"]]
            assert final["records"] == g["atoms_ptr"].shape[0] - 1 == (10 if hook.name == "snapshots" else 2)
            assert final["atoms"] == int(g["atoms_ptr"][-1])


def test_calls_before_the_first_firing_and_a_never_fired_hook_are_no_ops(tmp_path):
    for hook, _ in _hooks(tmp_path):
        hook.flush()
        assert hook.sync() == {}
        hook.close()
        hook.flush()
        assert hook.sync() == {}
        hook.close()


def test_hooks_an_engine_closed_are_committed_whole_by_the_runs_final_boundary(tmp_path):
    """nvalchemi's standalone run() closes its hooks in ``finally``; the run's final boundary
    comes after that and must commit everything the hooks wrote, not raise on the closed files."""
    run = Run(tmp_path / "run", comm=SingleCommunicator(), handle_signals=False)
    hooks = [(run.logging_hook(ring_size=4), Stage.AFTER_STEP), (run.snapshot_hook(), Stage.AFTER_STEP),
             (run.converged_hook(), Stage.ON_CONVERGE)]
    b = make_batch([2, 3, 1], seed=9)
    for step in range(6):
        perturb(b, step)
        for hook, stage in hooks:
            hook(Ctx(b, step_count=step, converged_mask=torch.tensor([step >= 2, False, True])), stage)
    for hook, _ in hooks:  # the engine's finally
        hook.close()
    run.close()
    last = json.loads((tmp_path / "run" / "run.json").read_text())["last"]
    committed = last["ranks"][0]["hooks"]
    assert committed["log"]["rows"] == 18 == len(pd.read_csv(tmp_path / "run" / committed["log"]["path"]))
    assert committed["snapshots"]["records"] == 18 and committed["converged"]["records"] == 2
    assert last["merged"]["records"] == 2
    merged = zarr.open_group(tmp_path / "run" / "data.zarr", mode="r", use_consolidated=False)["converged"]
    assert merged["sample_id"][:].tolist() == [2, 0] and merged["step"][:].tolist() == [0, 2]

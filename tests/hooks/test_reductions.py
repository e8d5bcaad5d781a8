"""LoggingHook's two reductions (the fused Warp kernel and the eager torch reference) against the
same independent float64 reference, over the batch variants engines hand over; which one ran;
and that the fused steady state issues no torch op at all (profiler count, not a timing)."""
from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dist_hooks.hooks import LoggingHook
from dist_hooks.hooks.reductions import warp_available
from dist_hooks.stages import Stage

from batches import Ctx, make_batch, perturb, with_dtype, with_grad
from mp.runner import REPO_ROOT, clean_env
from test_logging_hook import compare, read_csv, reference_rows

pytest.importorskip("warp", reason="the fused path needs warp-lang (dist_hooks[fast], in [test])")
MODES = ("fused", "eager")


def record(tmp_path, mode, batches, **kw) -> tuple[list[dict], LoggingHook]:
    """Fire a hook once per (step, batch) of ``batches`` (an iterable: a batch may be changed in
    place between firings) and return the CSV rows and the closed hook."""
    hook = LoggingHook(log_path=tmp_path / f"{mode}.csv", rank=0, reductions=mode, ring_size=4, **kw)
    want = []
    for step, b in batches:
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want += reference_rows(b, step, 0)
    hook.close()
    return want, hook


def in_place(b, steps):
    for step in range(steps):
        perturb(b, step)
        yield step, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_updates_over_rings(tmp_path, mode, dtype):
    """An integrator updating its batch in place, 11 firings over rings of 4: the fused path
    replays its recorded launch, and every row is the state at its own firing."""
    want, hook = record(tmp_path, mode, in_place(make_batch([3, 7, 1, 12, 5], seed=1, dtype=dtype), 11))
    assert hook.reductions_used == mode
    compare(read_csv(tmp_path / f"{mode}.rank-00000.csv"), want)


def _variants():
    """Batches that reach the kernel's rebinding and flag paths: new tensors every firing, int32
    offsets and ids, masses of shape (N,), a strided forces view, no system_id nor status."""
    def fresh():  # an engine that assigns new tensors each step
        b = make_batch([2, 5, 3], seed=2)
        for step in range(6):
            b.forces = torch.randn(b.forces.shape, generator=torch.Generator().manual_seed(step))
            b.energy = b.energy + 1.0
            yield step, b

    def int32():
        b = make_batch([4, 1, 6], seed=3)
        b.batch_ptr, b.system_id = b.batch_ptr.to(torch.int32), (b.system_id + 7).to(torch.int32)
        b.atomic_masses = b.atomic_masses.reshape(-1)
        return in_place(b, 5)

    def strided():
        b = make_batch([3, 3, 4], seed=4)
        wide = torch.randn(b.forces.shape[0], 6)
        b.forces = wide[:, ::2]  # a non-contiguous (N, 3) view
        return in_place(b, 5)

    def bare():  # no system_id, no status: sample ids are batch positions, status 0
        b = make_batch([2, 3], seed=5)
        ns = SimpleNamespace(**{k: v for k, v in vars(b).items() if k not in ("system_id", "status")})
        for step in range(5):
            perturb(ns, step)
            yield step, ns

    return {"fresh": fresh, "int32": int32, "strided": strided, "bare": bare}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(_variants()))
def test_batch_variants_match_the_reference(tmp_path, mode, variant):
    batches = list(_variants()[variant]())
    hook = LoggingHook(log_path=tmp_path / "v.csv", rank=0, reductions=mode, ring_size=4)
    want = []
    for step, b in batches:
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        want += _reference(b, step)
    hook.close()
    assert hook.reductions_used == mode
    compare(read_csv(tmp_path / "v.rank-00000.csv"), want)


def _reference(b, step):
    """reference_rows for batches that may lack system_id/status (then position and 0)."""
    full = SimpleNamespace(**vars(b))
    B = b.batch_ptr.shape[0] - 1
    if not hasattr(b, "system_id"):
        full.system_id = torch.arange(B).reshape(B, 1)
        full.status = torch.zeros(B, 1, dtype=torch.int64)
    full.batch_ptr = b.batch_ptr.to(torch.int64)
    full.atomic_masses = b.atomic_masses.reshape(-1)
    return reference_rows(full, step, 0)


def test_nan_forces_give_nan_fmax_on_both_paths(tmp_path):
    for mode in MODES:
        b = make_batch([3, 4], seed=6)
        b.forces[1, 2] = float("nan")  # in system 0, not its last atom: the max must stay NaN
        hook = LoggingHook(log_path=tmp_path / f"{mode}.csv", rank=0, reductions=mode)
        hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
        hook.close()
        rows = read_csv(tmp_path / f"{mode}.rank-00000.csv")
        assert math.isnan(float(rows[0]["fmax"])) and not math.isnan(float(rows[1]["fmax"])), mode


def test_batches_the_kernel_does_not_take_fall_back_to_torch(tmp_path, caplog):
    """bfloat16 velocities (no Warp type) that require grad: auto and fused both give eager's
    values, fused says so in a warning; a later batch the kernel takes gets the kernel."""
    b = with_dtype(with_grad(make_batch([3, 1, 5], seed=7)), torch.bfloat16, ("velocities",))
    for mode in ("auto", "fused"):
        want, hook = record(tmp_path / mode, mode, [(0, b), (1, b)])
        assert hook.reductions_used == "eager"
        compare(read_csv(tmp_path / mode / f"{mode}.rank-00000.csv"), want)
    assert "velocities is torch.bfloat16" in caplog.text
    # the same field names turning bfloat16 after the kernel was bound: torch takes over
    first = make_batch([3, 1, 5], seed=7)
    hook = LoggingHook(log_path=tmp_path / "switch.csv", rank=0)
    hook(Ctx(first, step_count=0), Stage.AFTER_STEP)
    assert hook.reductions_used == "fused"
    hook(Ctx(b, step_count=1), Stage.AFTER_STEP)
    assert hook.reductions_used == "eager"
    hook.close()
    compare(read_csv(tmp_path / "switch.rank-00000.csv"),
            reference_rows(first, 0, 0) + reference_rows(b, 1, 0))


def test_auto_prefers_the_kernel_where_warp_is_installed(tmp_path):
    assert warp_available()
    _, hook = record(tmp_path, "auto", in_place(make_batch([2, 2], seed=8), 2))
    assert hook.reductions_used == "fused"


def test_the_fused_steady_state_issues_no_torch_op(tmp_path):
    """Profiler count per firing once the kernel is bound: none for fused (one Warp launch,
    outside torch), some dozens for eager; a structural check, not a timing."""
    counts = {}
    for mode in MODES:
        b = make_batch([5, 9, 2, 7], seed=9)
        hook = LoggingHook(log_path=tmp_path / f"{mode}.csv", rank=0, reductions=mode,
                           ring_size=64, flush_interval=None)
        for step in range(3):
            hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(3, 13):
                hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        counts[mode] = sum(1 for e in prof.events() if e.name.startswith("aten::")) / 10
        hook.close()
    assert counts["fused"] == 0 and counts["eager"] >= 10, counts


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reductions must be one of"):
        LoggingHook(log_path=tmp_path / "x.csv", reductions="graph")


def test_fused_without_warp_is_a_missing_dependency():
    """In a process where warp cannot be imported: fused fails at the first firing naming the
    extra; auto reduces with torch."""
    code = """
import sys, tempfile, pathlib
sys.modules["warp"] = None  # import warp raises ImportError here
from dist_hooks.errors import MissingDependencyError
from dist_hooks.hooks import LoggingHook
from batches import Ctx, make_batch
d = pathlib.Path(tempfile.mkdtemp())
auto = LoggingHook(log_path=d / "a.csv", rank=0)
auto(Ctx(make_batch([2, 3]), step_count=0))
assert auto.reductions_used == "eager", auto.reductions_used
auto.close()
try:
    LoggingHook(log_path=d / "f.csv", rank=0, reductions="fused")(Ctx(make_batch([2]), step_count=0))
except MissingDependencyError as e:
    assert "dist_hooks[fast]" in str(e), e
    print("refused")
"""
    env = clean_env()
    env["PYTHONPATH"] = f"{REPO_ROOT}:{REPO_ROOT / 'tests' / 'support'}"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip() == "refused", res.stderr[-2000:]


def test_the_fused_path_keeps_no_batch_tensor_alive(tmp_path):
    """What replay remembers of the batch is held weakly: forces straight from an autograd model
    (and so their graph) are freed once the engine drops them, between firings."""
    import gc
    import weakref

    b = with_grad(make_batch([3, 4], seed=10))
    hook = LoggingHook(log_path=tmp_path / "g.csv", rank=0, reductions="fused")
    hook(Ctx(b, step_count=0), Stage.AFTER_STEP)
    assert hook.reductions_used == "fused"
    gone = weakref.ref(b.forces)
    b.forces = b.forces.detach().clone()  # the engine's next forces replace these
    gc.collect()
    assert gone() is None
    hook(Ctx(b, step_count=1), Stage.AFTER_STEP)  # re-bound: still recorded
    hook.close()
    assert len(read_csv(tmp_path / "g.rank-00000.csv")) == 4

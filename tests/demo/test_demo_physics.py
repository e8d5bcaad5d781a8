"""Physics and protocol tests of the demo workload (dist_hooks.demo), fast on 2 CPU cores.

Why these: the recording layer is validated against this workload, so its forces must be the true
gradient, FIRE must relax, NVE must conserve energy, ids must be unique across ranks, and the engine
must fire hooks exactly in nvalchemi's order with nvalchemi's step_count semantics.
"""
from __future__ import annotations

import enum
from pathlib import Path

import pytest
import torch

from dist_hooks.demo import (
    FIRE,
    HookContext,
    Langevin,
    LennardJones,
    VelocityVerlet,
    kinetic_energy,
    make_batch,
    maxwell_boltzmann_velocities,
    temperature,
)
from dist_hooks.demo.workload import ARGON_EPSILON, ARGON_SIGMA, system_rng
from dist_hooks.stages import Stage


# ------------------------------------------------------------------ helpers
def reference_energy_forces(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 LJ energy per system written straightforwardly, forces = -autograd gradient."""
    ptr = batch.batch_ptr.tolist()
    energies, forces = [], []
    for s in range(batch.num_systems):
        x = batch.positions[ptr[s]:ptr[s + 1]].detach().double().clone().requires_grad_(True)
        e = x.new_zeros(())
        n = x.shape[0]
        for i in range(n):
            for j in range(i + 1, n):
                r = torch.linalg.vector_norm(x[i] - x[j])
                sr6 = (ARGON_SIGMA / r) ** 6
                e = e + 4.0 * ARGON_EPSILON * (sr6 * sr6 - sr6)
        (g,) = torch.autograd.grad(e, x) if n > 1 else (torch.zeros_like(x),)
        energies.append(e.detach())
        forces.append(-g)
    return torch.stack(energies), torch.cat(forces)


class Recorder:
    """A hook that records (stage, step_count, name) for every stage it is called at."""

    def __init__(self, name: str, log: list, *, frequency: int = 1, stage=None, stages=None):
        self.name, self.log, self.frequency, self.stage = name, log, frequency, stage
        self._stages = stages
        self.masks: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.entered = self.exited = 0

    def _runs_on_stage(self, stage) -> bool:
        return self._stages is None or stage in self._stages

    def __call__(self, ctx: HookContext, stage) -> None:
        assert isinstance(ctx, HookContext) and ctx.workflow is not None and ctx.batch is not None
        self.log.append((Stage(stage), ctx.step_count, self.name))
        if Stage(stage) == Stage.ON_CONVERGE:
            self.masks.append((ctx.step_count, ctx.converged_mask.clone(), ctx.batch.status.clone()))
        else:
            assert ctx.converged_mask is None


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_forces_are_minus_gradient_of_float64_energy(dtype, rtol):
    batch = make_batch(5, min_atoms=2, max_atoms=14, seed=7, dtype=dtype)
    out = LennardJones()(batch)
    e_ref, f_ref = reference_energy_forces(batch)
    assert out["energy"].shape == (5, 1) and out["forces"].shape == batch.positions.shape
    assert out["energy"].dtype == dtype and out["forces"].dtype == dtype
    fscale = f_ref.abs().max()
    torch.testing.assert_close(out["energy"][:, 0].double(), e_ref, rtol=rtol, atol=rtol * e_ref.abs().max())
    torch.testing.assert_close(out["forces"].double(), f_ref, rtol=0, atol=rtol * fscale)
    # Newton's third law per system: total force vanishes.
    net = torch.zeros(5, 3, dtype=torch.float64).index_add_(0, batch.batch_idx, out["forces"].double())
    assert net.abs().max() < 10 * rtol * fscale


# ------------------------------------------------------------------ the batch
def test_batch_layout_and_pointers():
    b = make_batch(9, min_atoms=3, max_atoms=17, seed=3)
    n = b.num_atoms
    assert b.num_systems == b.num_graphs == 9
    assert b.batch_ptr.dtype == torch.int64 and b.batch_ptr.shape == (10,)
    assert b.batch_ptr[0] == 0 and b.batch_ptr[-1] == n
    counts = torch.bincount(b.batch_idx, minlength=9)
    assert torch.equal(counts, b.batch_ptr[1:] - b.batch_ptr[:-1])
    assert torch.equal(b.batch_idx, torch.repeat_interleave(torch.arange(9), counts))
    assert counts.min() >= 3 and counts.max() <= 17 and b.max_atoms == int(counts.max())
    assert len(set(counts.tolist())) > 1  # sizes vary
    for name, shape, dtype in [
        ("positions", (n, 3), torch.float32), ("velocities", (n, 3), torch.float32),
        ("forces", (n, 3), torch.float32), ("atomic_numbers", (n,), torch.int64),
        ("atomic_masses", (n,), torch.float32), ("energy", (9, 1), torch.float32),
        ("cell", (9, 3, 3), torch.float32), ("pbc", (9, 3), torch.bool),
        ("status", (9, 1), torch.int64), ("system_id", (9, 1), torch.int64),
    ]:
        t = getattr(b, name)
        assert t.shape == shape and t.dtype == dtype, name
    assert not b.pbc.any() and b.stress is None
    # Clusters lie inside their box; centre-of-mass velocity removed.
    lo = b.positions.min(0).values
    assert (lo > 0).all()
    p = torch.zeros(9, 3).index_add_(0, b.batch_idx, b.atomic_masses[:, None] * b.velocities)
    assert p.abs().max() < 1e-4


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_system_id_unique_across_ranks_and_streams_independent(world):
    n = 6
    batches = [make_batch(n, min_atoms=2, max_atoms=6, seed=11, rank=r, world_size=world) for r in range(world)]
    ids = torch.cat([b.system_id[:, 0] for b in batches])
    assert ids.unique().numel() == world * n
    assert torch.equal(ids.sort().values, torch.arange(world * n))
    if world > 1:  # each rank draws its own systems
        assert not torch.equal(batches[0].positions[:8], batches[1].positions[:8])
    again = make_batch(n, min_atoms=2, max_atoms=6, seed=11, rank=world - 1, world_size=world)
    assert torch.equal(again.positions, batches[-1].positions)  # reproducible from (seed, rank)
    with pytest.raises(ValueError):
        make_batch(n, rank=world, world_size=world)


# ------------------------------------------------------------------ FIRE
def test_fire_lowers_energy_of_every_system_and_converges_at_different_steps():
    b = make_batch(16, min_atoms=4, max_atoms=24, seed=5)
    dyn = FIRE(LennardJones(), b, fmax=1e-3)
    dyn.setup()
    e0 = b.energy[:, 0].clone()
    conv_step = torch.full((16,), -1)
    frozen_pos = {}
    for _ in range(300):
        dyn.step()
        newly = dyn.converged_mask & (conv_step < 0)
        conv_step[newly] = dyn.step_count - 1
        for s in newly.nonzero()[:, 0].tolist():
            frozen_pos[s] = b.positions[b.batch_ptr[s]:b.batch_ptr[s + 1]].clone()
    assert (conv_step >= 0).all(), "every system converges within 300 steps"
    assert (b.energy[:, 0] < e0).all(), "FIRE lowers the energy of every system"
    assert len(set(conv_step.tolist())) >= 4, f"systems converge at different steps: {conv_step}"
    assert (b.status[:, 0] == 1).all()
    # Converged systems are frozen: no motion after convergence, zero velocity.
    for s, pos in frozen_pos.items():
        assert torch.equal(b.positions[b.batch_ptr[s]:b.batch_ptr[s + 1]], pos)
    assert b.velocities.abs().max() == 0
    fmax = torch.zeros(16).scatter_reduce_(0, b.batch_idx, b.forces.norm(dim=-1), "amax")
    assert (fmax < 1e-3).all()


# ------------------------------------------------------------------ MD
def _relaxed_thermal_batch(n_systems: int, seed: int, dtype=torch.float32):
    b = make_batch(n_systems, min_atoms=6, max_atoms=24, seed=seed, dtype=dtype)
    model = LennardJones()
    FIRE(model, b, fmax=1e-3).run(250)
    b.status.zero_()
    b.velocities.copy_(maxwell_boltzmann_velocities(
        b.atomic_masses, b.batch_idx, b.num_systems, 30.0, system_rng(seed, 0, 2)))
    return b, model


def test_nve_total_energy_is_conserved():
    b, model = _relaxed_thermal_batch(8, seed=2)
    dyn = VelocityVerlet(model, b, dt_fs=5.0)
    dyn.setup()
    e_tot, ke = [], []
    for _ in range(300):
        dyn.step()
        k = kinetic_energy(b)
        e_tot.append(b.energy[:, 0] + k)
        ke.append(k)
    e_tot, ke = torch.stack(e_tot).double(), torch.stack(ke).double()
    ke_scale = ke.mean(0)  # per system
    assert (ke_scale > 0).all()
    max_dev = (e_tot - e_tot[0]).abs().max(0).values / ke_scale
    drift = (e_tot[-30:].mean(0) - e_tot[:30].mean(0)).abs() / ke_scale
    # Measured ~6e-4 (fluctuation) and ~2e-4 (drift) with 5 fs in float32.
    assert max_dev.max() < 5e-3, max_dev
    assert drift.max() < 2e-3, drift


def test_langevin_thermalises_towards_target():
    b, model = _relaxed_thermal_batch(8, seed=4)
    b.velocities.zero_()
    Langevin(model, b, dt_fs=5.0, temperature_k=30.0, friction_per_fs=0.02, seed=1).run(300)
    t = temperature(b).mean().item()
    assert torch.isfinite(b.positions).all() and 15.0 < t < 45.0, t


# ------------------------------------------------------------------ hook protocol
def test_hooks_fire_in_nvalchemi_order_with_step_count_semantics():
    b = make_batch(8, min_atoms=4, max_atoms=12, seed=1)
    dyn = FIRE(LennardJones(), b, fmax=2e-3)
    log: list = []
    every = Recorder("every", log)  # stage None + _runs_on_stage: all stages
    after2 = Recorder("after2", log, frequency=2, stage=Stage.AFTER_STEP)
    conv = Recorder("conv", log, stage="ON_CONVERGE")  # stage given by name
    second = Recorder("second", log, stage=Stage.BEFORE_STEP)
    for h in (every, after2, conv, second):
        dyn.register_hook(h)
    n_steps = 150
    prev_status = b.status.clone()
    dyn.run(n_steps)
    assert dyn.step_count == n_steps

    per_step: dict[int, list] = {}
    for stage, step, name in log:
        per_step.setdefault(step, []).append((stage, name))
    assert sorted(per_step) == list(range(n_steps))
    for step, events in per_step.items():
        expect = []
        for stage in list(Stage)[:8]:
            expect.append((stage, "every"))
            if stage == Stage.BEFORE_STEP:
                expect.append((stage, "second"))  # registration order within a stage
            if stage == Stage.AFTER_STEP and step % 2 == 0:
                expect.append((stage, "after2"))
        if any(s == Stage.ON_CONVERGE for s, _ in events):
            expect += [(Stage.ON_CONVERGE, "every"), (Stage.ON_CONVERGE, "conv")]
        assert events == expect, (step, events)
    # The first hook call ever is step 0 at BEFORE_STEP.
    assert log[0] == (Stage.BEFORE_STEP, 0, "every")

    # ON_CONVERGE carries a fresh (B,) bool mask of the systems that converged at that step.
    assert len(conv.masks) >= 2
    seen = torch.zeros(8, dtype=torch.bool)
    for step, mask, status in conv.masks:
        assert mask.dtype == torch.bool and mask.shape == (8,) and mask.any()
        assert not (mask & seen).any()  # newly converged only
        assert (status[mask, 0] == 1).all()  # status already set when ON_CONVERGE fires
        seen |= mask
    assert torch.equal(seen, dyn.converged_mask)
    assert torch.equal(prev_status, torch.zeros_like(prev_status))


def test_on_converge_all_mode_repeats_converged_systems():
    b = make_batch(4, min_atoms=4, max_atoms=8, seed=2)
    dyn = FIRE(LennardJones(), b, fmax=2e-3, on_converge="all")
    conv = Recorder("conv", [], stage=Stage.ON_CONVERGE)
    dyn.register_hook(conv)
    dyn.run(150)
    first = conv.masks[0][0]
    assert [s for s, _, _ in conv.masks] == list(range(first, 150))  # every step once any converged
    for _, mask, status in conv.masks:
        assert torch.equal(mask, status[:, 0] == 1)


def test_stage_given_by_foreign_enum_and_unknown_stage():
    class Foreign(enum.Enum):  # another library's enum: matched by name
        AFTER_COMPUTE = 42
        ON_ADMISSION = 9

    log: list = []
    b = make_batch(2, min_atoms=3, max_atoms=4, seed=0)
    dyn = VelocityVerlet(LennardJones(), b)
    dyn.register_hook(Recorder("foreign", log, stage=Foreign.AFTER_COMPUTE))
    dyn.register_hook(Recorder("unknown", log, stage=Foreign.ON_ADMISSION))
    dyn.run(3)
    assert log == [(Stage.AFTER_COMPUTE, i, "foreign") for i in range(3)]


def test_run_enters_and_closes_hooks_even_on_error():
    events: list[str] = []

    class CM:
        frequency, stage = 1, Stage.AFTER_STEP

        def __enter__(self):
            events.append("enter")
            return self

        def __exit__(self, *exc):
            events.append("exit")
            return False

        raised = False

        def __call__(self, ctx, stage):
            if ctx.step_count == 2 and not CM.raised:
                CM.raised = True
                raise RuntimeError("boom")

    class Closable:
        frequency, stage = 1, Stage.BEFORE_STEP

        def __call__(self, ctx, stage):
            pass

        def close(self):
            events.append("close")

    b = make_batch(2, min_atoms=3, max_atoms=4, seed=0)
    dyn = VelocityVerlet(LennardJones(), b)
    dyn.register_hook(CM())
    dyn.register_hook(Closable())
    with pytest.raises(RuntimeError, match="boom"):
        dyn.run(5)
    assert events == ["enter", "close", "exit"]
    events.clear()
    assert dyn.step_count == 2  # the failed step did not count
    dyn.step()  # step() alone never enters or closes hooks
    assert events == [] and dyn.step_count == 3


# ------------------------------------------------------------------ CLI
def test_cli_runs_in_process_and_prints_run_output_last(tmp_path: Path, capsys):
    from dist_hooks.demo import __main__ as cli

    out = tmp_path / "run"
    rc = cli.main(["--out", str(out), "--steps", "20", "--systems-per-rank", "4",
                   "--min-atoms", "3", "--max-atoms", "10", "--device", "cpu", "--seed", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"Run output: {out.resolve()}"
    assert any(line.startswith("[demo] rank 0/1") for line in lines)
    assert sum("step" in line and "%" in line for line in lines) >= 5  # progress ~every 10%
    res = cli.last_result
    assert res is not None and out.is_dir()
    relax, md = res.dynamics
    assert isinstance(relax, FIRE) and isinstance(md, VelocityVerlet)
    assert relax.step_count == 10 and md.step_count == 20  # one continuous step counter
    assert res.table is not None and res.table[0]["systems"] == 4
    assert cli.build_hooks(cli.build_parser().parse_args([]), None) == []


def test_resolve_steps():
    from dist_hooks.demo.__main__ import build_parser, resolve_steps

    p = build_parser()
    assert resolve_steps(p.parse_args(["--steps", "100"])) == (50, 50)
    assert resolve_steps(p.parse_args(["--steps", "100", "--relax-steps", "30"])) == (30, 70)
    assert resolve_steps(p.parse_args(["--steps", "100", "--md-steps", "10"])) == (90, 10)
    assert resolve_steps(p.parse_args(["--phase", "relax", "--steps", "7"])) == (7, 0)
    assert resolve_steps(p.parse_args(["--phase", "md", "--steps", "7"])) == (0, 7)

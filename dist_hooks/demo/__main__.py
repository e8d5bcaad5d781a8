"""``python -m dist_hooks.demo``: relax and/or run MD on LJ clusters on every rank, with hooks.

Why: an end-to-end workload for the recording layer that runs the same way on one CPU process, under
``torchrun``, ``srun`` or ``mpiexec``. Each rank draws its own systems from (seed, rank), steps them
on its device, and the recording hooks from ``build_hooks`` observe every step. At the end each rank
prints a one-line summary, rank 0 prints the gathered table and, as the very last line,
``Run output: <absolute run directory>`` (scripts parse it).

Phases: ``relax`` (FIRE), ``md`` (velocity Verlet NVE, or Langevin with ``--thermostat``) or ``both``
(FIRE, then MD on the relaxed structures with fresh Maxwell-Boltzmann velocities). Both phases share
one hook lifetime and one continuous ``step_count``, so recorded steps are unique and increasing.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..comm import Communicator, get_communicator
from ..errors import DistHooksError, exit_code_of
from ..launch import LaunchInfo, detect_launch
from ..run import Run
from ..stages import Stage
from ..store.object_storage import is_url
from .dynamics import FIRE, BaseDynamics, Langevin, VelocityVerlet, hook_lifetime
from .workload import (
    LennardJones,
    DemoBatch,
    make_batch,
    maxwell_boltzmann_velocities,
    system_rng,
    temperature,
)

__all__ = ["DemoResult", "build_hooks", "build_parser", "main", "resolve_steps", "run_demo"]


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (every option has a default, so a bare run works)."""
    p = argparse.ArgumentParser(
        prog="python -m dist_hooks.demo",
        description="Relax (FIRE) and/or run MD on argon-like LJ clusters on every rank, "
        "with the dist_hooks recording hooks attached.",
    )
    p.add_argument("--out", default="runs/demo",
                   help="run output directory, or s3://bucket/prefix (credentials and endpoint from "
                        "the AWS_* environment variables) (default: runs/demo)")
    p.add_argument("--phase", choices=("relax", "md", "both"), default="both",
                   help="what to run (default: both = FIRE then MD)")
    p.add_argument("--steps", type=int, default=300,
                   help="total steps; split evenly for --phase both unless "
                   "--relax-steps/--md-steps say otherwise (default: 300)")
    p.add_argument("--relax-steps", type=int, default=None, help="FIRE steps (overrides the split)")
    p.add_argument("--md-steps", type=int, default=None, help="MD steps (overrides the split)")
    p.add_argument("--systems-per-rank", type=int, default=64, help="systems per rank (default: 64)")
    p.add_argument("--min-atoms", type=int, default=8, help="smallest cluster (default: 8)")
    p.add_argument("--max-atoms", type=int, default=64, help="largest cluster (default: 64)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r draws from (seed, r)")
    p.add_argument("--fmax", type=float, default=1e-3, help="FIRE convergence, eV/Å (default 1e-3)")
    p.add_argument("--dt", type=float, default=5.0, help="MD time step in fs (default: 5)")
    p.add_argument("--fire-dt", type=float, default=10.0, help="FIRE start time step in fs")
    p.add_argument("--fire-dt-max", type=float, default=50.0, help="FIRE max time step in fs")
    p.add_argument("--temperature", type=float, default=30.0,
                   help="Maxwell-Boltzmann / Langevin temperature in K (default: 30)")
    p.add_argument("--thermostat", action="store_true", help="Langevin NVT instead of NVE for MD")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--on-converge", choices=("new", "all"), default="new",
                   help="ON_CONVERGE mask: newly converged systems (new) or every converged "
                   "system each step, as nvalchemi without inflight replacement (all)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    rec = p.add_argument_group("recording")
    rec.add_argument("--no-record", action="store_true", help="run the workload without any hook")
    rec.add_argument("--log-every", type=int, default=1, help="LoggingHook frequency (default: 1)")
    rec.add_argument("--reductions", choices=("auto", "fused", "eager"), default="auto",
                     help="LoggingHook's reductions: one Warp kernel (fused), torch ops (eager), or "
                     "fused where Warp is installed (auto, the default)")
    rec.add_argument("--snapshot-every", type=int, default=10,
                     help="SnapshotHook frequency; 0 disables snapshots (default: 10)")
    rec.add_argument("--checkpoint-every", type=int, default=50,
                     help="checkpoint boundary every N steps; 0: only the final one (default: 50)")
    rec.add_argument("--storage", choices=("shared", "local"), default="shared",
                     help="shared run directory, or node-local rank data (see --local-dir)")
    rec.add_argument("--local-dir", default=None, help="node-local data directory for --storage local")
    rec.add_argument("--resume", choices=("auto", "never", "always"), default="auto",
                     help="continue a run found in --out (auto), refuse one (never), or require one")
    rec.add_argument("--no-lock", action="store_true",
                     help="record without the lock of --out (a filesystem that cannot lock; "
                     "then make sure no other job writes it)")
    # fault injection for the crash-and-resume tests: this rank SIGKILLs itself before step N
    rec.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
    rec.add_argument("--fail-rank", type=int, default=0, help=argparse.SUPPRESS)
    # ... once rank 0 committed every boundary before it (it commits in the background, so a kill
    # soon after a boundary can otherwise land before that boundary is in force)
    rec.add_argument("--fail-after-commit", action="store_true", help=argparse.SUPPRESS)
    # ... after that and after flushing every hook: the files are then as a writer leaves them
    # between flushes, not cut half-way through one (tests that open them)
    rec.add_argument("--fail-after-flush", action="store_true", help=argparse.SUPPRESS)
    rec.add_argument("--timeout", type=float, default=300.0,
                     help="seconds a rank waits for the others at a boundary before failing")
    return p


def resolve_steps(args: argparse.Namespace) -> tuple[int, int]:
    """(relax_steps, md_steps) from --phase, --steps and the optional explicit counts."""
    total = max(int(args.steps), 0)
    r, m = args.relax_steps, args.md_steps
    if args.phase == "relax":
        return (total if r is None else r), 0
    if args.phase == "md":
        return 0, (total if m is None else m)
    if r is None and m is None:
        r = total // 2
        return r, total - r
    if r is None:
        r = max(total - m, 0)
    if m is None:
        m = max(total - r, 0)
    return int(r), int(m)


def build_hooks(args: argparse.Namespace, run: Any) -> list[Any]:
    """Recording hooks to attach to the demo's dynamics (registered on every phase, in order).

    Logging every ``--log-every`` steps, snapshots every ``--snapshot-every`` steps, converged
    structures once each, and the run itself last (its checkpoint boundaries act before a step, after
    every hook of the previous step has recorded).
    """
    if run is None:
        return []
    hooks = [run.logging_hook(frequency=args.log_every, reductions=args.reductions)]
    if args.snapshot_every > 0:
        hooks.append(run.snapshot_hook(frequency=args.snapshot_every))
    hooks.append(run.converged_hook())
    hooks.append(run)
    return hooks


class _KillAt:
    """Test fault injection: SIGKILL this process at BEFORE_STEP of ``step`` (no cleanup, as a
    crash). With ``run``: first wait until the boundaries before are committed, so that the
    boundary in force is known; with ``flush`` also flush the hooks, so the kill cannot land inside
    a flush (whose arrays would then differ in length)."""

    frequency = 1
    stage = Stage.BEFORE_STEP

    def __init__(self, step: int, run: Run | None = None, flush: bool = False):
        self.step = step
        self.run = run
        self.flush = flush

    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if ctx.step_count == self.step:
            if self.run is not None:
                if self.flush:
                    self.run.flush()
                self.run.wait_committed()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _demo_state(batch: DemoBatch, dyn: "BaseDynamics | None") -> dict[str, Any]:
    """What a resumed demo needs to continue bit for bit: the batch tensors and the integrator's."""
    state: dict[str, Any] = {"batch": {k: getattr(batch, k).clone() for k in batch.keys()}}
    if isinstance(dyn, FIRE):
        state["fire"] = {"dt": dyn.dt.clone(), "alpha": dyn.alpha.clone(), "n_pos": dyn.n_pos.clone()}
    elif dyn is not None:
        state["md"] = True
        gen = getattr(dyn, "generator", None)
        if gen is not None:
            state["generator"] = gen.get_state()
    return state


def _restore_batch(batch: DemoBatch, state: dict[str, Any]) -> None:
    for k, v in state["batch"].items():
        getattr(batch, k).copy_(v)


def _pick_device(spec: str, launch: Any) -> torch.device:
    """``auto``: this rank's GPU (LOCAL_RANK modulo visible GPUs) when CUDA is up, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            spec = f"cuda:{int(getattr(launch, 'local_rank', 0)) % torch.cuda.device_count()}"
        else:
            spec = "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(getattr(launch, "local_rank", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _launch_and_comm() -> tuple[LaunchInfo, Communicator]:
    """This process's launch info and communicator."""
    launch = detect_launch()
    return launch, get_communicator("auto", launch=launch)


#: The result of the latest ``main()`` in this process (tests and embedding drivers read it).
last_result: "DemoResult | None" = None


@dataclass
class DemoResult:
    """What a demo run leaves behind (for tests and for drivers that embed the demo)."""

    out_dir: "Path | str"  # a directory, or the s3:// URL of a run in an object store
    batch: DemoBatch
    model: LennardJones
    dynamics: list[BaseDynamics] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] | None = None


def run_demo(args: argparse.Namespace, launch: Any, comm: Any) -> DemoResult:
    """Build the batch, model, dynamics and hooks for this rank, run the phases, summarise."""
    rank, world = int(comm.rank), int(comm.world_size)
    device = _pick_device(args.device, launch)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    out_dir: Path | str = args.out if is_url(args.out) else Path(args.out).resolve()
    n_relax, n_md = resolve_steps(args)
    total = n_relax + n_md

    batch = make_batch(args.systems_per_rank, min_atoms=args.min_atoms, max_atoms=args.max_atoms,
                       seed=args.seed, rank=rank, world_size=world, device=device, dtype=dtype,
                       temperature_k=args.temperature)
    model = LennardJones()
    current: dict[str, Any] = {"dyn": None}
    run = None
    if not args.no_record:
        run = Run(out_dir, checkpoint_every=args.checkpoint_every or None, comm=comm, launch=launch,
                  storage=args.storage, local_dir=args.local_dir, resume=args.resume, timeout=args.timeout,
                  state_fn=lambda: _demo_state(batch, current["dyn"]), lock=not args.no_lock,
                  settings={k: v for k, v in vars(args).items() if k not in ("out",)})
    hooks = build_hooks(args, run)
    if args.fail_at_step is not None and rank == args.fail_rank:
        waits = args.fail_after_commit or args.fail_after_flush
        hooks.insert(0, _KillAt(args.fail_at_step, run if waits else None, args.fail_after_flush))
    resume = run.resume_state if run is not None else None
    start = run.start_step if run is not None and resume is not None else 0
    if resume is not None:
        _restore_batch(batch, resume)
        if rank == 0 and not args.quiet:
            print(f"[demo] resuming {out_dir} at step {start}", flush=True)
    result = DemoResult(out_dir=out_dir, batch=batch, model=model, hooks=hooks)
    common = {"global_rank": rank, "on_converge": args.on_converge}

    def new_md(step_count: int) -> BaseDynamics:
        if args.thermostat:
            return Langevin(model, batch, dt_fs=args.dt, temperature_k=args.temperature,
                            friction_per_fs=args.friction, seed=args.seed * 1000003 + rank,
                            step_count=step_count, **common)
        return VelocityVerlet(model, batch, dt_fs=args.dt, step_count=step_count, **common)

    every = max(total // 10, 1)
    done = start
    t0 = time.perf_counter()

    def progress(phase: str, dyn: BaseDynamics) -> None:
        if rank != 0 or args.quiet:
            return
        conv = int(dyn.converged_mask.sum().item())  # one sync per ~10% of the run
        rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
        print(f"[demo] {phase:5s} step {done}/{total} ({100 * done // max(total, 1)}%) "
              f"converged {conv}/{batch.num_systems} on rank 0, {rate:.1f} steps/s", flush=True)

    try:
        with hook_lifetime([h for h in hooks if h is not run]):
            step_count = start
            for phase, first, last in (("relax", 0, n_relax), ("md", n_relax, total)):
                n = last - max(first, step_count)
                if n <= 0:
                    continue
                if phase == "relax":
                    dyn: BaseDynamics = FIRE(model, batch, fmax=args.fmax, dt_start_fs=args.fire_dt,
                                             dt_max_fs=args.fire_dt_max, step_count=step_count, **common)
                    if resume is not None and "fire" in resume:
                        _restore_batch(batch, resume)  # FIRE starts from rest; the saved state does not
                        for k, v in resume["fire"].items():
                            getattr(dyn, k).copy_(v)
                else:
                    dyn = new_md(step_count)
                    if resume is not None and resume.get("md"):
                        if "generator" in resume:
                            dyn.generator.set_state(resume["generator"])
                    elif n_relax > 0:  # FIRE left the clusters at rest: thermalise the relaxed structures
                        batch.velocities.copy_(maxwell_boltzmann_velocities(
                            batch.atomic_masses, batch.batch_idx, batch.num_systems,
                            args.temperature, system_rng(args.seed, rank, 2)))
                current["dyn"] = dyn
                for hook in hooks:
                    dyn.register_hook(hook)
                result.dynamics.append(dyn)
                left = n
                while left > 0:
                    k = min(left, every - done % every)
                    dyn.run(k, manage_hooks=False)
                    done += k
                    left -= k
                    if done % every == 0 or done == total:
                        progress(phase, dyn)
                step_count = dyn.step_count
            if run is not None:
                run.close(step=total)  # final boundary, before the hooks' own close
    except BaseException:
        if run is not None and not run._closed:
            run.__exit__(*sys.exc_info())
        raise
    _sync(device)
    elapsed = time.perf_counter() - t0

    converged = int((batch.status[:, 0] >= 1).sum().item())
    summary = {
        "rank": rank,
        "device": str(device),
        "systems": batch.num_systems,
        "atoms": batch.num_atoms,
        "converged": converged,
        "mean_energy_ev": float(batch.energy.mean().item()) if batch.num_systems else float("nan"),
        "mean_temperature_k": float(temperature(batch).mean().item()) if batch.num_systems else 0.0,
        "steps": total,
        "steps_run": total - start,  # this launch's share (0: a finished run relaunched)
        "seconds": elapsed,
        "steps_per_s": (total - start) / elapsed if elapsed > 0 and total > start else float("nan"),
    }
    result.summary = summary
    speed = (f"{summary['steps_per_s']:.1f} steps/s" if total > start else
             f"nothing left to run (already at step {start} of {total})")
    print(f"[demo] rank {rank}/{world} {device}: systems {summary['systems']}, atoms "
          f"{summary['atoms']}, converged {converged}, mean final energy "
          f"{summary['mean_energy_ev']:.5f} eV, {speed}", flush=True)
    table = comm.gather(summary, root=0)
    if rank == 0 and table is not None:
        result.table = list(table)
        print(f"{'rank':>5} {'device':>8} {'systems':>8} {'atoms':>7} {'converged':>9} "
              f"{'mean E (eV)':>12} {'T (K)':>7} {'steps/s':>9}")
        for row in result.table:
            print(f"{row['rank']:>5} {row['device']:>8} {row['systems']:>8} {row['atoms']:>7} "
                  f"{row['converged']:>9} {row['mean_energy_ev']:>12.5f} "
                  f"{row['mean_temperature_k']:>7.2f} "
                  f"{format(row['steps_per_s'], '.1f') if row['steps_run'] else '-':>9}")
        n_sys = sum(r["systems"] for r in result.table)
        n_conv = sum(r["converged"] for r in result.table)
        n_ranks = len(result.table)
        print(f"total: {n_ranks} rank{'s' if n_ranks != 1 else ''}, {n_sys} systems, {n_conv} "
              f"converged", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: detect the launcher, run this rank's demo, print ``Run output:`` last on rank 0.
    A refusal or failure the package raises on purpose (a held run, bad credentials, a timed-out
    rank) is one line on stderr and the exit status of ``dist-hooks`` for it (docs/cli.md)."""
    global last_result
    args = build_parser().parse_args(argv)
    launch, comm = _launch_and_comm()
    rank = int(comm.rank)
    try:
        result = run_demo(args, launch, comm)
        last_result = result
        comm.barrier()
    except DistHooksError as exc:  # refused or failed on purpose: say why in one line
        print(f"[demo] rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return exit_code_of(exc)
    finally:
        comm.close()
    if rank == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"Run output: {result.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

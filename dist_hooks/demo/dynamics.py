"""A small dynamics engine that follows nvalchemi's hook protocol, for the demo workload.

Why our own engine: the recording hooks must plug into nvalchemi's dynamics unchanged, but we do not
depend on nvalchemi. This engine reproduces the parts of its protocol that hooks can observe:

* ``register_hook(hook)``; a hook has ``frequency``, ``stage`` (or ``stage=None`` and
  ``_runs_on_stage(stage)``) and ``__call__(ctx, stage)``; optional ``on_register(engine)``.
* every step fires BEFORE_STEP, BEFORE_PRE_UPDATE, AFTER_PRE_UPDATE, BEFORE_COMPUTE, AFTER_COMPUTE,
  BEFORE_POST_UPDATE, AFTER_POST_UPDATE, AFTER_STEP, then ON_CONVERGE when the convergence mask has
  any True. Hooks fire in registration order when the stage matches and
  ``step_count % frequency == 0``. ``step_count`` starts at 0 and is incremented after the whole step,
  so all hooks of one step see the same count and every hook fires at step 0.
* ``ctx`` is a kw-only ``HookContext(batch, model, global_rank, workflow, step_count,
  converged_mask)``; ``converged_mask`` is a fresh (B,) bool tensor at ON_CONVERGE, None elsewhere.
* ``run(n)`` enters hooks that are context managers and closes them (``__exit__`` or ``close()``) in a
  ``finally``; ``step()`` never does, as nvalchemi's distributed pipeline calls ``step()`` directly.

Host synchronisation: calling hooks needs none (sizes come from shapes, all state stays on device).
Deciding whether ON_CONVERGE fires needs ``mask.any()`` on the host: one sync per check, and only when
an ON_CONVERGE hook is registered; ``converge_check_every=k`` makes it one sync per k steps (the
newly-converged systems of those k steps are OR-ed into one mask).

Convergence state is in ``batch.status`` (B,1): 0 while running, ``exit_status`` once converged; FIRE
freezes converged systems (zero velocity, no displacement) but keeps them in the batch and keeps
evaluating them, as nvalchemi does without inflight replacement. ``status`` is updated during the
post-update phase, so AFTER_POST_UPDATE/AFTER_STEP hooks see a status consistent with the forces
they see, and ON_CONVERGE sees the new status.

Time steps are given in femtoseconds and converted to the internal unit Å·sqrt(amu/eV).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..stages import Stage, stage_matches
from .workload import FS, KB_EV, DemoBatch, segment_max, segment_sum

__all__ = [
    "FIRE",
    "BaseDynamics",
    "HookContext",
    "Langevin",
    "VelocityVerlet",
    "hook_lifetime",
]



@dataclass(kw_only=True)
class HookContext:
    """What a hook receives, with nvalchemi's field names (read extras with ``getattr``)."""

    batch: Any
    model: Any = None
    global_rank: int = 0
    workflow: Any = None
    step_count: int = 0
    converged_mask: torch.Tensor | None = None


def _runs_on(hook: Any, stage: Stage) -> bool:
    """Whether ``hook`` fires at ``stage``: its ``stage`` if set, else its ``_runs_on_stage``."""
    wanted = getattr(hook, "stage", None)
    if wanted is not None:
        return stage_matches(wanted, stage)
    fn = getattr(hook, "_runs_on_stage", None)
    return bool(fn(stage)) if callable(fn) else False


@contextlib.contextmanager
def hook_lifetime(hooks: Iterable[Any]) -> Iterator[None]:
    """Enter hooks that are context managers and close the others that have ``close()``.

    Same lifetime handling as nvalchemi's standalone ``run()``. Exposed so a driver that chains
    several ``run(..., manage_hooks=False)`` calls (relax then MD) opens and closes hooks once.
    Exits run in reverse order of entry, even when the simulation raises.
    """
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            if hasattr(hook, "__enter__") and hasattr(hook, "__exit__"):
                stack.enter_context(hook)
            elif callable(getattr(hook, "close", None)):
                stack.callback(hook.close)
        yield


class BaseDynamics:
    """Engine skeleton: hooks, stage order, step counter, convergence bookkeeping.

    Subclasses implement ``pre_update`` / ``post_update`` (integrator halves) and may implement
    ``converged_now`` (a (B,) bool of systems meeting the criterion this step).

    ``on_converge="new"`` (default) fires ON_CONVERGE with the systems that converged at this step;
    ``"all"`` mimics nvalchemi without inflight replacement, where the mask holds every system meeting
    the criterion, so frozen systems are reported again at every step (recording hooks must
    de-duplicate; the demo can produce both behaviours for their tests).
    """

    def __init__(
        self,
        model: Any,
        batch: DemoBatch,
        *,
        global_rank: int = 0,
        step_count: int = 0,
        exit_status: int = 1,
        on_converge: Literal["new", "all"] = "new",
        converge_check_every: int = 1,
    ) -> None:
        if on_converge not in ("new", "all"):
            raise ValueError(f"on_converge must be 'new' or 'all', got {on_converge!r}")
        if converge_check_every < 1:
            raise ValueError("converge_check_every must be >= 1")
        self.model = model
        self.batch = batch
        self.global_rank = int(global_rank)
        self.step_count = int(step_count)
        self.exit_status = int(exit_status)
        self.on_converge = on_converge
        self.converge_check_every = int(converge_check_every)
        self.hooks: list[Any] = []
        self._by_stage: dict[Stage, list[Any]] = {s: [] for s in Stage}
        self._forces_valid = False
        self._pending = torch.zeros(batch.num_systems, dtype=torch.bool, device=batch.device)

    # ---------------------------------------------------------------- hooks
    def register_hook(self, hook: Any) -> None:
        """Add ``hook``; stage membership is evaluated now (hooks declare static stages)."""
        freq = int(getattr(hook, "frequency", 1))
        if freq < 1:
            raise ValueError(f"hook frequency must be >= 1, got {freq}")
        self.hooks.append(hook)
        for stage in Stage:
            if _runs_on(hook, stage):
                self._by_stage[stage].append(hook)
        on_register = getattr(hook, "on_register", None)
        if callable(on_register):
            on_register(self)

    def _fire(self, stage: Stage, converged_mask: torch.Tensor | None = None) -> None:
        hooks = self._by_stage[stage]
        if not hooks:
            return
        ctx = HookContext(
            batch=self.batch,
            model=self.model,
            global_rank=self.global_rank,
            workflow=self,
            step_count=self.step_count,
            converged_mask=converged_mask,
        )
        n = self.step_count
        for hook in hooks:
            if n % int(getattr(hook, "frequency", 1)) == 0:
                hook(ctx, stage)

    # ---------------------------------------------------------------- physics plumbing
    def compute(self) -> None:
        """Evaluate the model and write energy/forces into the batch in place."""
        out = self.model(self.batch)
        self.batch.energy.copy_(out["energy"].reshape(self.batch.energy.shape))
        self.batch.forces.copy_(out["forces"])
        self._forces_valid = True

    def pre_update(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def post_update(self) -> None:
        """Second half of the integrator; the default does nothing."""

    def converged_now(self) -> torch.Tensor | None:
        """(B,) bool: systems meeting the convergence criterion now; None if there is none."""
        return None

    @property
    def converged_mask(self) -> torch.Tensor:
        """(B,) bool: systems whose status is at least ``exit_status``."""
        return self.batch.status[:, 0] >= self.exit_status

    def _active_atoms(self) -> torch.Tensor:
        """(N,1) bool: atoms of systems still running."""
        return (self.batch.status[:, 0] < self.exit_status)[self.batch.batch_idx][:, None]

    def _update_status(self) -> None:
        """Mark newly converged systems (device-only); remember them for ON_CONVERGE."""
        meets = self.converged_now()
        if meets is None:
            return
        status = self.batch.status
        newly = meets & (status[:, 0] < self.exit_status)
        status.masked_fill_(newly[:, None], self.exit_status)
        self._pending |= newly

    def _maybe_fire_converge(self) -> None:
        if not self._by_stage[Stage.ON_CONVERGE]:
            self._pending.zero_()
            return
        if (self.step_count + 1) % self.converge_check_every:
            return
        if self.on_converge == "all":
            meets = self.converged_now()
            mask = meets if meets is not None else self._pending
        else:
            mask = self._pending.clone()
        self._pending.zero_()
        if bool(mask.any()):  # the one host sync per check
            self._fire(Stage.ON_CONVERGE, mask)

    # ---------------------------------------------------------------- stepping
    def setup(self) -> None:
        """Compute initial forces once, before the first step (lazy, so construction is cheap)."""
        if not self._forces_valid:
            self.compute()

    def step(self) -> None:
        """One step in nvalchemi's stage order; ``step_count`` is incremented at the very end."""
        self.setup()
        f = self._fire
        f(Stage.BEFORE_STEP)
        f(Stage.BEFORE_PRE_UPDATE)
        self.pre_update()
        f(Stage.AFTER_PRE_UPDATE)
        f(Stage.BEFORE_COMPUTE)
        self.compute()
        f(Stage.AFTER_COMPUTE)
        f(Stage.BEFORE_POST_UPDATE)
        self.post_update()
        self._update_status()
        f(Stage.AFTER_POST_UPDATE)
        f(Stage.AFTER_STEP)
        self._maybe_fire_converge()
        self.step_count += 1

    def run(self, n_steps: int, *, manage_hooks: bool = True) -> None:
        """Run ``n_steps`` steps; with ``manage_hooks`` enter/close the hooks around them."""
        cm = hook_lifetime(self.hooks) if manage_hooks else contextlib.nullcontext()
        with cm:
            for _ in range(int(n_steps)):
                self.step()


class FIRE(BaseDynamics):
    """FIRE geometry relaxation with independent per-system parameters (Bitzek et al. 2006).

    Each step, per system: P = F·v; if P > 0, mix v ← (1-α)v + α|v|F̂ and, after ``n_min`` positive
    steps, grow dt (× ``f_inc``, capped at ``dt_max_fs``) and shrink α (× ``f_alpha``); if P ≤ 0, set
    v = 0, dt × ``f_dec``, α = ``alpha_start``. Then v += dt F/m and x += dt v, the displacement capped
    at ``maxstep`` Å per atom (the largest atom move of a system is scaled down to ``maxstep``).
    A system converges when fmax = max_i ||F_i|| < ``fmax``; it then gets ``exit_status`` and freezes.

    Velocities are zeroed at construction (FIRE starts at rest). dt defaults: 10 fs start, 50 fs max,
    stable for argon (fastest cluster vibration period about 500 fs).
    """

    def __init__(
        self,
        model: Any,
        batch: DemoBatch,
        *,
        fmax: float = 1e-3,
        dt_start_fs: float = 10.0,
        dt_max_fs: float = 50.0,
        n_min: int = 5,
        f_inc: float = 1.1,
        f_dec: float = 0.5,
        alpha_start: float = 0.1,
        f_alpha: float = 0.99,
        maxstep: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, batch, **kwargs)
        self.fmax = float(fmax)
        self.dt_max = float(dt_max_fs) * FS
        self.n_min = int(n_min)
        self.f_inc, self.f_dec = float(f_inc), float(f_dec)
        self.alpha_start, self.f_alpha = float(alpha_start), float(f_alpha)
        self.maxstep = float(maxstep)
        b, dev, dt = batch.num_systems, batch.device, batch.positions.dtype
        self.dt = torch.full((b,), float(dt_start_fs) * FS, dtype=dt, device=dev)
        self.alpha = torch.full((b,), self.alpha_start, dtype=dt, device=dev)
        self.n_pos = torch.zeros(b, dtype=torch.int64, device=dev)
        batch.velocities.zero_()

    def converged_now(self) -> torch.Tensor:
        norms = torch.linalg.vector_norm(self.batch.forces, dim=-1)
        return segment_max(norms, self.batch.batch_idx, self.batch.num_systems) < self.fmax

    def pre_update(self) -> None:
        bt = self.batch
        bi, b = bt.batch_idx, bt.num_systems
        f, v, x = bt.forces, bt.velocities, bt.positions
        active = bt.status[:, 0] < self.exit_status
        power = segment_sum((f * v).sum(-1), bi, b)
        vnorm = segment_sum((v * v).sum(-1), bi, b).sqrt()
        fnorm = segment_sum((f * f).sum(-1), bi, b).sqrt()
        up = power > 0
        mix = self.alpha * vnorm / fnorm.clamp_min(torch.finfo(f.dtype).tiny)
        v_new = (1.0 - self.alpha)[bi, None] * v + mix[bi, None] * f
        v_new = torch.where(up[bi, None], v_new, torch.zeros_like(v))

        grow = up & (self.n_pos > self.n_min) & active
        shrink = ~up & active
        self.dt.copy_(torch.where(grow, (self.dt * self.f_inc).clamp_max(self.dt_max), self.dt))
        self.dt.copy_(torch.where(shrink, self.dt * self.f_dec, self.dt))
        self.alpha.copy_(torch.where(grow, self.alpha * self.f_alpha, self.alpha))
        self.alpha.masked_fill_(shrink, self.alpha_start)
        self.n_pos.copy_(torch.where(up & active, self.n_pos + 1, torch.where(active, 0, self.n_pos)))

        dt_atom = self.dt[bi, None]
        v_new = v_new + dt_atom * f / bt.atomic_masses[:, None]
        run_atoms = active[bi, None]
        v_new = torch.where(run_atoms, v_new, torch.zeros_like(v_new))
        dx = dt_atom * v_new
        step_max = segment_max(torch.linalg.vector_norm(dx, dim=-1), bi, b)
        scale = (self.maxstep / step_max.clamp_min(self.maxstep)).to(dx.dtype)
        v.copy_(v_new)
        x.add_(dx * scale[bi, None])


class VelocityVerlet(BaseDynamics):
    """NVE molecular dynamics (velocity Verlet): half kick, drift | compute | half kick.

    With ``dt_fs`` = 5 fs, relaxed argon clusters thermalised at 30 K keep total energy within ~6e-4
    of their mean kinetic energy over 300 steps (drift ~2e-4), in float32; the error scales as dt².
    Unrelaxed (compressed, perturbed) starts need ~2 fs for the same bound. No convergence
    criterion: ON_CONVERGE never fires and ``status`` is left as it is.
    """

    def __init__(self, model: Any, batch: DemoBatch, *, dt_fs: float = 5.0, **kwargs: Any) -> None:
        super().__init__(model, batch, **kwargs)
        self.dt = float(dt_fs) * FS

    def _half_kick(self) -> None:
        bt = self.batch
        bt.velocities.add_(bt.forces / bt.atomic_masses[:, None], alpha=0.5 * self.dt)

    def pre_update(self) -> None:
        self._half_kick()
        self.batch.positions.add_(self.batch.velocities, alpha=self.dt)

    def post_update(self) -> None:
        self._half_kick()


class Langevin(VelocityVerlet):
    """NVT Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews), per-atom friction.

    ``friction_per_fs`` is γ in 1/fs; ``temperature_k`` the bath temperature. The noise comes from a
    torch generator on the batch's device seeded with ``seed`` (reproducible per device type).
    """

    def __init__(
        self,
        model: Any,
        batch: DemoBatch,
        *,
        dt_fs: float = 5.0,
        temperature_k: float = 30.0,
        friction_per_fs: float = 0.01,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, batch, dt_fs=dt_fs, **kwargs)
        self.temperature_k = float(temperature_k)
        gamma = float(friction_per_fs) / FS  # 1/internal time
        self.c1 = math.exp(-gamma * self.dt)
        self.generator = torch.Generator(device=batch.device)
        self.generator.manual_seed(int(seed))
        self._sigma = torch.sqrt(
            (1.0 - self.c1 * self.c1) * KB_EV * self.temperature_k / batch.atomic_masses
        )[:, None]

    def pre_update(self) -> None:
        bt = self.batch
        v, x = bt.velocities, bt.positions
        self._half_kick()  # B
        x.add_(v, alpha=0.5 * self.dt)  # A
        noise = torch.randn(v.shape, generator=self.generator, device=v.device, dtype=v.dtype)
        v.mul_(self.c1).add_(self._sigma * noise)  # O
        x.add_(v, alpha=0.5 * self.dt)  # A

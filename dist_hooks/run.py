"""``Run``: the hooks of one recorded run, its checkpoint boundaries and its resume.

Design (after torch.distributed.checkpoint's split of planning, storage and coordination, and
GROMACS's ``-cpi -append``):

- Every rank writes only its own files. At a boundary each rank drains its hooks, fsyncs, saves the
  caller's simulation state (optional) and sends a *commit record* — lengths and checksums, never
  data in shared storage mode — to the coordinator (rank 0) over the communicator.
- The coordinator (:mod:`.coordinator`) merges the converged records committed since the previous
  boundary by all ranks into ``data.zarr/converged``, writes an immutable per-boundary file and
  then the run manifest ``run.json`` atomically. That is the commit point: a crash anywhere
  before it leaves the previous boundary in force.
- On relaunch with the same directory the manifest is read (rank 0) and broadcast; every rank cuts
  its CSVs and Zarr groups back to the committed lengths (checking the committed prefix's
  checksum), the coordinator cuts the merged group back, and the caller gets its saved state.

A boundary happens *before* a step (stage BEFORE_STEP), so that everything a step records — its
AFTER_STEP rows and its ON_CONVERGE records — falls on one side of it, and a resumed run restarts
exactly at the boundary's step.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable


from . import __version__
from .comm import Communicator, get_communicator
from .coordinator import BoundaryMessage, Coordinator, group_block
from .errors import DamageError, ResumeError, RunError
from .hooks import ConvergedSnapshotHook, LoggingHook, SnapshotHook, RecordingHook
from .launch import LaunchInfo, detect_launch
from .preemption import Preempted, StopSignals
from .records import CsrBlock
from .saved_state import SavedStates
from .stages import Stage, stage_matches
from .store import layout
from .store.group_reader import GroupReader
from .store.manifest import CommitRecord, CsvCommit, GroupCommit, HookCommit, HookSettings, \
    Manifest
from .store.object_storage import is_url, open_storage
from .store.storage import LocalRunStorage, RunLock, RunStorage, lock_holder
from .store.zarr_sink import ZarrSink

log = logging.getLogger("dist_hooks")



class Run:
    """A recorded run: where every rank's hooks write, and the checkpoint boundaries between them.

    Use it as a hook registered *after* the recording hooks (it acts at BEFORE_STEP), and call
    ``close()`` at the end (or use it as a context manager) for the final boundary::

        run = Run("runs/x", checkpoint_every=100)
        hooks = [run.logging_hook(), run.snapshot_hook(frequency=10), run.converged_hook(), run]
        ...
        run.close()

    ``storage="shared"``: all ranks write under ``path`` (a parallel filesystem); the coordinator
    reads the new converged records from the ranks' groups. ``storage="local"``: each rank writes
    under ``local_dir`` (node-local disk) and sends its new converged records to the coordinator
    with its commit record; ``path`` holds the manifest and the merged group.

    ``path`` may be ``s3://bucket/prefix``: every rank then writes its own objects straight to
    the object store (credentials and endpoint from ``storage_options`` or the ``AWS_*``
    variables, never written into the run; bad ones fail here), ``run.json`` is committed by a
    conditional PUT and the one-writer lock is a lease (docs/user-guide.md, "Recording to object
    storage").

    ``resume``: ``"auto"`` continues a run whose manifest exists (the normal relaunch, including
    torchrun restarts), ``"never"`` refuses an existing run, ``"always"`` refuses to start a new
    one. ``state_fn`` returns the simulation state to save at each boundary (anything
    ``torch.save`` takes); after a resume, ``resume_state`` holds the one saved at the boundary in
    force and ``start_step`` its step. ``sink_options``: the Zarr settings (``ZarrSink``'s
    parameters) of every group of the run, the merged converged group included.

    SIGTERM and SIGUSR1 (what SLURM's ``--signal`` and submitit send before the time limit) turn
    the next boundary into the last one: every rank commits, closes its hooks and raises
    ``Preempted`` (exit status 143). With one process that is the next step; with several it is
    the next regular boundary, since the ranks agree on stopping through the boundary's own
    gather, without an extra collective per step — choose ``checkpoint_every`` so that a boundary
    falls within the signal's lead time.

    One writer per run: rank 0 locks ``path`` (``RUN/.run.lock``; with ``storage="local"`` every
    rank also its files in ``local_dir``) until ``close()``; a second job is refused at start, on
    every rank, with ``LockHeldError`` naming the holder (``lock=False``: no lock). A resume
    first checks every committed prefix (``DamageError``), and refuses a committed hook missing
    now at the first step or boundary (``ResumeError``) unless ``drop_hooks`` names it (recorded
    in ``run.json``'s ``dropped``). ``flush``, ``sync``, ``checkpoint``, ``close`` and
    ``__exit__`` come in any order, any number of times; after ``close()`` they do nothing.
    """

    def __init__(self, path: str | os.PathLike, *, checkpoint_every: int | None = None,
                 comm: Communicator | None = None, launch: LaunchInfo | None = None,
                 storage: str = "shared", local_dir: str | os.PathLike | None = None,
                 resume: str = "auto", timeout: float = 300.0,
                 state_fn: Callable[[], Any] | None = None, handle_signals: bool = True,
                 sink_options: dict | None = None, settings: dict | None = None,
                 lock: bool = True, drop_hooks: Iterable[str] = (),
                 storage_options: dict[str, Any] | None = None):
        if storage not in ("shared", "local"):
            raise ValueError(f"storage must be 'shared' or 'local', got {storage!r}")
        if resume not in ("auto", "never", "always"):
            raise ValueError(f"resume must be 'auto', 'never' or 'always', got {resume!r}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if storage == "local" and local_dir is None:
            raise ValueError("storage='local' needs local_dir (this node's own disk)")
        self.drop_hooks = (drop_hooks,) if isinstance(drop_hooks, str) else tuple(drop_hooks)
        #: the run's files: a directory, or an object store (``s3://bucket/prefix``)
        self.run_files: RunStorage = open_storage(
            path if is_url(path) else Path(path).absolute(), storage_options)
        if storage == "local" and not self.run_files.is_local:
            raise ValueError(f"storage='local' keeps each rank's files on its node's disk; on "
                             f"{self.run_files.url()} every rank writes to the object store "
                             "itself: use storage='shared' (the default)")
        #: where the run is, as messages name it (a path, or an ``s3://`` URL)
        self.path = Path(self.run_files.url()) if self.run_files.is_local else self.run_files.url()
        self.storage_options = storage_options
        self.launch = launch if launch is not None else detect_launch()
        self.comm = comm if comm is not None else get_communicator(launch=self.launch, timeout=timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.timeout = timeout
        self.storage = storage
        self.rank_files: RunStorage = (LocalRunStorage(Path(local_dir).absolute())
                                       if storage == "local" else self.run_files)
        self._states = SavedStates(self.rank_files, self.rank)
        self.checkpoint_every = checkpoint_every
        self.state_fn = state_fn
        self.settings = dict(settings or {})
        self.stage = Stage.BEFORE_STEP
        self.frequency = 1
        self._hooks: dict[str, RecordingHook] = {}
        self._sink = None
        self._sink_options = dict(sink_options or {})
        self._prev: dict[str, HookCommit] = {}  # this rank's hooks in its previous commit record
        self._signals = StopSignals(f"rank {self.rank}", "step's boundary" if self.world_size == 1
                                    else "checkpoint boundary")
        self._closed = False
        self._next_step: int | None = None
        self._boundary_index = 0
        self._last_summary: dict | None = None
        self._hooks_checked: bool | BaseException = False
        self._locks: list[RunLock] = []
        self.coordinator = (Coordinator(self.run_files, shared=storage == "shared",
                                        sink_options=self._sink_options)
                            if self.rank == 0 else None)
        self.last_timing: dict = {}
        self.manifest: Manifest | None = None
        self.resume_state: Any = None
        self.start_step = 0
        self._resume_points: dict[str, HookCommit] | None = None
        try:
            manifest = self._start(resume, lock)
        except BaseException:
            self._shut(quiet=True)  # nothing of the run is held by a job that was refused
            raise
        if handle_signals:
            self._signals.install()
        log.info("dist_hooks run %s: rank %d of %d (%s), %s", self.path, self.rank, self.world_size,
                 self.launch.launcher, f"resumed at step {self.start_step}" if manifest else "new")

    def _start(self, resume: str, lock: bool) -> Manifest | None:
        """Lock, read and check what is there, agree on it, and only then write.

        Rank 0 locks the run directory, creates the shared hierarchy and reads the manifest; the
        broadcast of the manifest (the barrier after which every rank may open the store) carries
        rank 0's refusal too, so every rank raises it instead of waiting for a boundary. Then
        every rank takes its own lock (node-local storage), checks its committed data and loads
        its saved state; one more exchange (only on a resume or with node-local storage) makes
        every rank raise the first rank's error. Nothing is cut back or committed before."""
        found: tuple = (None, None)
        own: BaseException | None = None
        if self.rank == 0:
            try:
                self.run_files.make_root()
                if lock:
                    self._locks.append(self.run_files.lock(self._holder()))
                if self.storage == "shared":  # once, before any rank opens it
                    self.run_files.create_hierarchy()
                found = (self._read_manifest(), None)
            except Exception as exc:  # noqa: BLE001 - every rank raises it, see _raise_from
                own, found = exc, (None, (type(exc), str(exc)))
        manifest, sent = self.comm.broadcast(found if self.rank == 0 else None, root=0)
        if sent is not None:
            self._raise_from(0, own if own is not None else sent)
        if manifest is not None and resume == "never":
            raise ResumeError(f"{self.path} already holds a run (run.json); pass resume='auto' "
                              "to continue it or choose another directory")
        if manifest is None and resume == "always":
            raise ResumeError(f"resume='always' but {self.path} has no run.json to continue")
        if manifest is not None and manifest.world_size != self.world_size:
            raise ResumeError(
                f"{self.path} was recorded with world size {manifest.world_size}, this job has "
                f"{self.world_size}: each rank continues its own files and simulation state, so a "
                "resume needs the same world size")
        error = None
        try:
            self.rank_files.make_root()
            if self.storage == "local" and lock:
                self._locks.append(self.rank_files.lock(
                    self._holder(), f".run.{layout.rank_name(self.rank)}.lock"))
            if manifest is not None:
                self._prepare_resume(manifest)
        except Exception as exc:  # noqa: BLE001 - every rank raises it, see _agree
            error = exc
        if manifest is not None or self.storage == "local":
            self._agree(error)
        elif error is not None:
            raise error
        # agreed: from here on this job writes
        self.manifest = manifest
        if self.storage == "local":
            self.rank_files.create_hierarchy()
        if manifest is not None and self.coordinator is not None:
            self.coordinator.resume(manifest.merged)
        elif manifest is None and self.rank == 0:
            self.manifest = self._new_manifest()
            self.run_files.commit_manifest(self.manifest.encode())
        return manifest

    def _holder(self) -> dict[str, Any]:
        """Who holds the lock, as a refused job is told."""
        return lock_holder(self.launch.launcher, self.launch.job_id, rank=self.rank)

    def _agree(self, error: BaseException | None) -> None:
        """Every rank raises the first error any rank found, or none does: a check that fails
        on one rank must not leave the others waiting for it at the next boundary."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        sent = None if error is None else (type(error), str(error))
        found = self.comm.gather(sent, root=0, timeout=self.timeout)
        first = None
        if self.rank == 0:
            first = next(((r, e) for r, e in enumerate(found) if e is not None), None)
        first = self.comm.broadcast(first, root=0, timeout=self.timeout)
        if first is not None:
            self._raise_from(first[0], error if first[0] == self.rank else first[1])

    def _raise_from(self, rank: int, error: BaseException | tuple) -> None:
        """Raise ``error`` (this rank's own) or ``(type, message)`` as another rank sent it."""
        if isinstance(error, BaseException):
            raise error
        cls, message = error
        try:
            exc = cls(f"rank {rank}: {message}")
        except Exception:  # noqa: BLE001 - a class that takes other arguments
            exc = RunError(f"rank {rank}: {cls.__name__}: {message}")
        raise exc

    @property
    def last_coordinate_s(self) -> float | None:
        """Seconds rank 0's last merge and manifest commit took (in the background)."""
        return self.coordinator.last_commit_s if self.coordinator is not None else None

    # -- hooks placed in this run ------------------------------------------------------------------
    @property
    def sink(self) -> ZarrSink:
        """The ``ZarrSink`` of this rank's ``data.zarr`` (created on first use)."""
        if self._sink is None:
            self._sink = ZarrSink(self.rank_files.url(layout.DATA_DIR),
                                  storage_options=self._object_options(), **self._sink_options)
        return self._sink

    def add_hook(self, hook: RecordingHook) -> RecordingHook:
        """Make ``hook`` part of this run: it records as this rank, is committed at every
        boundary and, on a resumed run, is cut back to what the boundary in force committed."""
        if hook.name in self._hooks:
            raise ValueError(f"a hook named {hook.name!r} is already part of this run")
        where = hook.committed_path(self.rank)
        if where is not None and self.rank_files.relative(where) is None:
            raise RunError(f"hook {hook.name!r} writes {where}, outside {self.rank_files.url()}: a run "
                           "names its files by paths inside it (use run.logging_hook(), or a "
                           "log_path under the run directory)")
        point = None
        if self._resume_points is not None:
            # a hook that never reached a boundary is cut back to nothing
            c = self._resume_points.get(hook.name)
            point = self._absolute(c) if c is not None else {}
        hook.bind(rank=self.rank, resume_point=point)
        self._hooks[hook.name] = hook
        return hook

    def logging_hook(self, name: str = "log", **kwargs: Any) -> LoggingHook:
        """A CSV ``LoggingHook`` writing ``logs/<name>/rank-XXXXX.csv`` of this run."""
        kwargs.setdefault("backend", "csv")
        kwargs.setdefault("storage_options", self._object_options())
        return self.add_hook(LoggingHook(log_path=self.rank_files.url(f"{layout.LOGS_DIR}/{name}"),
                                         name=name, **kwargs))

    def _object_options(self) -> dict[str, Any] | None:
        """The storage options the hooks' own handles on an object store take (none locally)."""
        return None if self.rank_files.is_local else self.storage_options

    def snapshot_hook(self, name: str = "snapshots", **kwargs: Any) -> SnapshotHook:
        return self.add_hook(SnapshotHook(self.sink, name=name, **kwargs))

    def converged_hook(self, name: str = "converged", **kwargs: Any) -> ConvergedSnapshotHook:
        """The per-rank converged hook; its records are merged into ``data.zarr/converged``."""
        return self.add_hook(ConvergedSnapshotHook(self.sink, name=name, **kwargs))

    # -- the boundary hook -------------------------------------------------------------------------
    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if self._closed or (stage is not None and not stage_matches(Stage.BEFORE_STEP, stage)):
            return
        step = int(getattr(ctx, "step_count", 0))  # a Python int on the engine: no host sync
        last = self._next_step
        if step < (self.start_step if last is None else last):
            raise self._step_error(step, last)
        if self._hooks_checked is not True:
            self._check_hooks_once()
        self._next_step = step
        if self.world_size == 1 and self._signals.received is not None:
            self._stop(self.checkpoint(step))  # not final: the run is interrupted, not finished
        if self.checkpoint_every and step > self.start_step and step % self.checkpoint_every == 0:
            summary = self.checkpoint(step)
            if summary["stop"] is not None:
                self._stop(summary)

    def _step_error(self, step: int, last: int | None) -> RunError:
        """Steps only go forward: a step recorded again would repeat committed rows, and a
        boundary at it would make a resume restart at the wrong place."""
        if last is None:
            return ResumeError(
                f"{self.path}: the run resumed at step {self.start_step} (the boundary in force) "
                f"but the engine is at step {step}: continue at run.start_step, from "
                "run.resume_state; recording earlier steps again would repeat committed ones")
        return RunError(f"{self.path}: step_count went back from {last} to {step}; steps must "
                        "not decrease within a run (recorded steps would repeat)")

    def _check_hooks_once(self) -> None:
        """On a resume, before the first boundary and before anything is written: every hook
        this rank committed data for is still part of the run, or ``drop_hooks`` names it.
        Once per run, and agreed between the ranks (the one exchange outside a boundary)."""
        if isinstance(self._hooks_checked, BaseException):
            raise self._hooks_checked  # refused once: every later boundary is refused too
        if self._hooks_checked is True:
            return
        self._hooks_checked = True
        if self._resume_points is None:
            return
        error: RunError | None = None
        both = sorted(set(self.drop_hooks) & set(self._hooks))
        missing = {n: c for n, c in self._resume_points.items()
                   if n not in self._hooks and n not in self.drop_hooks}
        if both:
            error = RunError(f"drop_hooks names {both}, which this run records too")
        elif missing:
            error = ResumeError(
                f"{self.path}: rank {self.rank} committed data for "
                f"{', '.join(f'{n!r} ({_data_of(c)})' for n, c in missing.items())} at boundary "
                f"{self._boundary_index - 1}, but the run's hooks are {sorted(self._hooks)}: "
                "add it again under the same name to continue it, or pass "
                f"drop_hooks={tuple(missing)!r} to leave its committed data out of the run")
        try:
            self._agree(error)
        except RunError as exc:
            self._hooks_checked = exc
            raise
        for n in self.drop_hooks:
            if n in self._resume_points:
                log.warning("rank %d: dropping hook %r (%s) from %s at the next boundary",
                            self.rank, n, _data_of(self._resume_points[n]), self.path)

    def _stop(self, summary: dict) -> None:
        """After a boundary that a signal asked for: close the hooks and leave with ``Preempted``."""
        self._closed = True
        self._shut()
        raise Preempted(summary["stop"] or signal.SIGTERM)

    def _shut(self, quiet: bool = False) -> None:
        """Close the hooks, restore the signal handlers and let go of the locks (the last two
        whatever happens); ``quiet``: a hook's error is not raised (another error matters more)."""
        try:
            for hook in self._hooks.values():
                try:
                    hook.close()
                except Exception:  # noqa: BLE001 - see quiet
                    if not quiet:
                        raise
        finally:
            self._signals.restore()
            for lk in self._locks:
                lk.release()

    def flush(self) -> None:
        """Push every hook's recorded data to its files (not a boundary: nothing is committed)."""
        if not self._closed:
            for hook in self._hooks.values():
                hook.flush()

    def wait_committed(self, timeout: float = 60.0) -> None:
        """Block until every boundary this rank has taken part in is in the manifest (rank 0
        commits in the background, so a returned :meth:`checkpoint` is not yet durable). Rank 0
        joins its commit; the others poll the manifest, which they can read only where the run
        directory is shared (``storage="shared"``). :class:`RunError` after ``timeout`` seconds."""
        if self.coordinator is not None:
            self.coordinator.join()
            return
        if self.storage != "shared":
            raise RunError(f"rank {self.rank} cannot read {self.run_files.url(layout.MANIFEST)} with "
                           "storage='local'; only rank 0 can wait for a commit there")
        deadline = time.monotonic() + timeout
        while True:
            manifest = self._read_manifest()
            if manifest is not None and len(manifest.boundaries) >= self._boundary_index:
                return
            if time.monotonic() > deadline:
                raise RunError(f"boundary {self._boundary_index - 1} not committed to "
                               f"{self.run_files.url(layout.MANIFEST)} after {timeout:g} s")
            time.sleep(0.05)

    def sync(self) -> dict[str, dict]:
        """Flush and fsync every hook (not a boundary); each hook's lengths by name."""
        return {} if self._closed else {n: h.sync() for n, h in self._hooks.items()}

    def checkpoint(self, step: int | None = None, *, final: bool = False) -> dict:
        """Commit a boundary now; every rank must call it at the same point of the run. ``step`` is
        the step a resumed run restarts at (everything recorded before it is committed). Returns
        the summary the coordinator broadcast: ``index``, ``all_final`` and ``stop`` (a signal
        number when any rank was asked to stop, else None). After ``close()``: the last summary
        (``None`` if there was none), and nothing happens."""
        if self._closed:
            return self._last_summary
        return self._boundary(step, final)

    def _boundary(self, step: int | None, final: bool) -> dict:
        self._check_hooks_once()
        step = self._next_step if step is None else step
        t0 = time.perf_counter()
        if self.coordinator is not None:
            self.coordinator.join()  # the previous boundary's merge and manifest come first
        message = self._message(step, final)
        t1 = time.perf_counter()
        messages = self.comm.gather(message, root=0, timeout=self.timeout)
        summary = None
        if self.rank == 0:
            stops = [m.record.signal for m in messages if m.record.signal is not None]
            summary = {"index": self._boundary_index,
                       "all_final": all(m.record.final for m in messages),
                       "stop": stops[0] if stops else None}
        summary = self.comm.broadcast(summary, root=0, timeout=self.timeout)
        t2 = time.perf_counter()
        if self.coordinator is not None:
            # the merge and the manifest run beside the simulation: nobody waits for them, and the
            # next boundary (or close) joins them first, so boundaries still commit in order
            self.coordinator.commit_async(self.manifest, messages, summary["index"],
                                          summary["all_final"], self._hook_settings())
            if final or summary["stop"] is not None or self._signals.received is not None:
                self.coordinator.join()
        self._boundary_index = summary["index"] + 1
        self._last_summary = summary
        self._states.prune()
        t3 = time.perf_counter()
        # where a boundary's time goes (benchmarks/bench_boundary.py reports it): making this
        # rank's data durable and agreeing with the others stall the caller; rank 0's merge and
        # manifest run in the background (``last_coordinate_s``)
        self.last_timing = {"sync_s": t1 - t0, "exchange_s": t2 - t1, "stall_s": t3 - t0,
                            "record_bytes": len(json.dumps(message.record.to_json()))}
        return summary

    def close(self, step: int | None = None) -> None:
        """Final boundary, at ``step`` (default: the step after the last one this run saw, i.e.
        the next step that would run). A rank that finishes early keeps joining the others'
        boundaries until every rank has finished, so nobody waits for it in vain."""
        if self._closed:
            return
        self._closed = True
        if step is None:
            step = self.start_step if self._next_step is None else self._next_step + 1
        try:
            while True:
                summary = self._boundary(step, final=True)
                if summary["all_final"]:
                    break
        finally:
            self._shut()  # the last boundary is committed (or failed): let go of the run

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or exc_type is Preempted or self._closed:
            self.close()
            return False
        self._closed = True  # no final boundary after an error: the one in force stays
        self._shut(quiet=True)  # keep what is there; the next boundary never came
        return False

    # -- one rank's part -----------------------------------------------------------------------------
    def _message(self, step: int | None, final: bool) -> BoundaryMessage:
        hooks: dict[str, HookCommit] = {}
        for name, hook in self._hooks.items():
            info = hook.sync()
            if info:
                hooks[name] = self._commit_of(hook, info)
            elif self._resume_points is not None and name in self._resume_points:
                hooks[name] = self._resume_points[name]  # never fired since the resume
        state = (self._states.save(self._boundary_index, step, self.state_fn)
                 if self.state_fn is not None else None)
        record = CommitRecord(self.rank, step, final, self._signals.received, time.time(), hooks, state)
        converged = self._new_converged(hooks) if self.storage == "local" else {}
        self._prev = hooks
        return BoundaryMessage(record, converged)

    def _commit_of(self, hook: RecordingHook, info: dict) -> HookCommit:
        """A hook's ``sync()`` result as its commit entry, paths relative to the rank root."""
        if hook.commit_kind == "csv":
            rel = self.rank_files.relative(info["path"]) or str(info["path"])
            return CsvCommit(rel, int(info["bytes"]), int(info["rows"]), int(info["crc32"]))
        return GroupCommit(info["group"], int(info["records"]), int(info["atoms"]),
                           dict(info["crc32"]), hook.merges_converged, info.get("files"))

    def _absolute(self, commit: HookCommit) -> dict:
        """A commit entry as a hook's resume point: its JSON, the CSV path made absolute."""
        out = commit.to_json()
        if isinstance(commit, CsvCommit) and not Path(commit.path).is_absolute():
            out["path"] = self.rank_files.url(commit.path)
        return out

    def _hook_settings(self) -> dict[str, HookSettings]:
        return {name: HookSettings(type(h).__name__, h.frequency, getattr(h.stage, "name", str(h.stage)),
                                   h.backend if isinstance(h, LoggingHook) else None)
                for name, h in self._hooks.items()}

    def _new_converged(self, hooks: dict[str, HookCommit]) -> dict[str, CsrBlock]:
        """This rank's converged records committed since its previous boundary (node-local
        storage: the coordinator cannot read them from disk)."""
        out = {}
        for name, c in hooks.items():
            old = self._prev.get(name)
            start = old.length if old is not None else 0
            if c.converged and c.length > start:
                reader = GroupReader(self.rank_files.zarr_store(),
                                     layout.hook_group(self.rank, name))
                out[name] = group_block(reader, start, c.length)
        return out

    # -- manifest and resume ---------------------------------------------------------------------
    def _new_manifest(self) -> Manifest:
        return Manifest(self.world_size, self.launch.launcher, self.storage, self.launch.job_id,
                        self.checkpoint_every, self.settings, dist_hooks_version=__version__,
                        created=time.time())

    def _read_manifest(self) -> Manifest | None:
        data = self.run_files.read_manifest()
        if data is None:
            return None
        try:
            return Manifest.parse(data, self.run_files.url(layout.MANIFEST))
        except DamageError as exc:
            raise DamageError(f"{exc}; it is written atomically, so it was damaged after the "
                              "fact") from exc

    def _prepare_resume(self, manifest: Manifest) -> None:
        """This rank's part of the boundary in force, read and checked (nothing written)."""
        self._boundary_index = len(manifest.boundaries)
        mine = manifest.last.rank(self.rank) if manifest.last is not None else None
        self._resume_points = dict(mine.hooks) if mine is not None else {}
        if mine is not None:
            self.start_step = int(mine.step or 0)
            self._prev = dict(mine.hooks)
            for name, c in mine.hooks.items():  # every hook, also one that never fires again
                self.rank_files.check_committed(c, f"rank {self.rank}, hook {name!r}")
            if mine.state is not None:
                self.resume_state = self._states.load(mine.state)
        if self.coordinator is not None:
            m = manifest.merged
            self.run_files.check_committed(GroupCommit(layout.CONVERGED_GROUP, m.records, m.atoms,
                                                       {}), "the merged group")


def _data_of(c: HookCommit) -> str:
    """A hook's committed data, as a message names them."""
    if isinstance(c, CsvCommit):
        return f"{c.rows} rows in {c.path}"
    return f"{c.records} records, {c.atoms} atoms in {c.group}"

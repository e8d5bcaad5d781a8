"""Checkpoint boundaries: crash-safe commits, the cross-rank merge of converged samples, resume.

Design (after torch.distributed.checkpoint's split of planning, storage and coordination, and GROMACS's
``-cpi -append``):

- Every rank writes only its own files. At a boundary each rank drains its hooks, fsyncs, saves the
  caller's simulation state (optional) and sends a *commit record* — lengths and checksums, never data
  in shared storage mode — to the coordinator (rank 0) over the communicator.
- The coordinator merges the converged records committed since the previous boundary by all ranks
  into ``data.zarr/converged`` (order: step, rank, sample_id; de-duplicated on (rank, sample_id)),
  writes an immutable per-boundary file and then the run manifest ``run.json`` atomically (temp file,
  fsync, rename, fsync of the directory). The rename is the commit point: a crash anywhere before it
  leaves the previous boundary in force.
- On relaunch with the same directory the manifest is read (rank 0) and broadcast; every rank cuts its
  CSVs and Zarr groups back to the committed lengths (checking the committed prefix's checksum), the
  coordinator cuts the merged group back, and the caller gets its saved state to continue from.

A boundary happens *before* a step (stage BEFORE_STEP), so that everything a step records — its
AFTER_STEP rows and its ON_CONVERGE records — falls on one side of it, and a resumed run restarts
exactly at the boundary's step.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import ResumeError
from .hooks import ConvergedSnapshotHook, LoggingHook, SnapshotHook, _RecordingHook
from .stages import Stage, stage_matches
from .store import layout
from .store.atomic_store import atomic_write_bytes, sync_dir

log = logging.getLogger("dist_hooks")

BOUNDARIES_DIR = "boundaries"
STATE_DIR = "state"
KEEP_STATES = 2  # the state of the boundary in force and of the one being written


class Preempted(SystemExit):
    """Raised after the final boundary that a SIGTERM/SIGUSR1 asked for; exit status 143."""

    def __init__(self, signum: int):
        super().__init__(143)
        self.signum = signum


class Run:
    """A recorded run: where every rank's hooks write, and the checkpoint boundaries between them.

    Use it as a hook registered *after* the recording hooks (it acts at BEFORE_STEP), and call
    ``close()`` at the end (or use it as a context manager) for the final boundary::

        run = Run("runs/x", checkpoint_every=100)
        hooks = [run.logging_hook(), run.snapshot_hook(frequency=10), run.converged_hook(), run]
        ...
        run.close()

    ``storage="shared"``: all ranks write under ``path`` (a parallel filesystem); the coordinator reads
    the new converged records from the ranks' shards. ``storage="local"``: each rank writes under
    ``local_dir`` (node-local disk) and sends its new converged records to the coordinator with its
    commit record; ``path`` holds the manifest and the merged group.

    ``resume``: ``"auto"`` continues a run whose manifest exists (the normal relaunch, including torchrun
    restarts), ``"never"`` refuses an existing run, ``"always"`` refuses to start a new one.
    ``state_fn`` returns the simulation state to save at each boundary (anything ``torch.save`` takes);
    after a resume, ``resume_state`` holds the one saved at the boundary in force and ``start_step`` its
    step.

    SIGTERM and SIGUSR1 (what SLURM's ``--signal`` and submitit send before the time limit) turn the next
    boundary into the last one: every rank commits, closes its hooks and raises ``Preempted`` (exit
    status 143). With one process that is the next step; with several it is the next regular boundary,
    since the ranks agree on stopping through the boundary's own gather, without an extra collective
    per step — choose ``checkpoint_every`` so that a boundary falls within the signal's lead time.
    """

    def __init__(self, path: str | os.PathLike, *, checkpoint_every: int | None = None, comm: Any = None,
                 launch: Any = None, storage: str = "shared", local_dir: str | os.PathLike | None = None,
                 resume: str = "auto", timeout: float = 300.0, state_fn: Callable[[], Any] | None = None,
                 handle_signals: bool = True, sink_options: dict | None = None,
                 settings: dict | None = None):
        from .launch import detect_launch
        from .comm import get_communicator

        if storage not in ("shared", "local"):
            raise ValueError(f"storage must be 'shared' or 'local', got {storage!r}")
        if resume not in ("auto", "never", "always"):
            raise ValueError(f"resume must be 'auto', 'never' or 'always', got {resume!r}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.path = Path(path).absolute()
        self.launch = launch if launch is not None else detect_launch()
        self.comm = comm if comm is not None else get_communicator(launch=self.launch, timeout=timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.timeout = timeout
        self.storage = storage
        if storage == "local" and local_dir is None:
            raise ValueError("storage='local' needs local_dir (this node's own disk)")
        self.rank_root = Path(local_dir).absolute() if storage == "local" else self.path
        self.checkpoint_every = checkpoint_every
        self.state_fn = state_fn
        self.settings = dict(settings or {})
        self.stage = Stage.BEFORE_STEP
        self.frequency = 1
        self._hooks: dict[str, _RecordingHook] = {}
        self._sink = None
        self._sink_options = dict(sink_options or {})
        self._prev_hooks: dict[str, dict] = {}  # this rank's hooks in its previous commit record
        self._signal: int | None = None
        self._closed = False
        self._next_step: int | None = None
        self._boundary_index = 0
        self._merged_writer = None
        self._merged_keys: set[tuple[int, int]] = set()
        self._coord_thread: threading.Thread | None = None
        self._coord_error: BaseException | None = None
        self.last_timing: dict = {}
        self.last_coordinate_s: float | None = None

        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            if storage == "shared":  # create the shared hierarchy once, before any rank opens it
                self._create_hierarchy(self.path)
        self.rank_root.mkdir(parents=True, exist_ok=True)
        if storage == "local":
            self._create_hierarchy(self.rank_root)
        # the broadcast doubles as the barrier after which every rank may open the store
        manifest = self.comm.broadcast(_read_manifest(self.path) if self.rank == 0 else None, root=0)
        self.manifest = manifest
        self.resume_state: Any = None
        self.start_step = 0
        self._resume_points: dict[str, dict] | None = None
        if manifest is not None:
            if resume == "never":
                raise ResumeError(f"{self.path} already holds a run (run.json); pass resume='auto' to continue "
                                  "it or choose another directory")
            self._prepare_resume(manifest)
        elif resume == "always":
            raise ResumeError(f"resume='always' but {self.path} has no run.json to continue")
        elif self.rank == 0:
            self._write_manifest(self._new_manifest())
        if handle_signals:
            self._install_signal_handlers()
        log.info("dist_hooks run %s: rank %d of %d (%s), %s", self.path, self.rank, self.world_size,
                 self.launch.launcher, f"resumed at step {self.start_step}" if manifest else "new")

    def _create_hierarchy(self, root: Path) -> None:
        """``data.zarr`` and its ``ranks`` group under ``root``. With node-local storage the
        ranks of one node create them in the same ``local_dir`` at the same time: whoever loses
        the race finds them made by another rank, which is as good."""
        import zarr
        from zarr.errors import ContainsGroupError
        from .store.atomic_store import AtomicLocalStore
        store = AtomicLocalStore(root / layout.DATA_DIR)
        for attempt in range(3):
            try:
                g = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
                if layout.RANKS_GROUP not in g:
                    g.create_group(layout.RANKS_GROUP)
                return
            except ContainsGroupError:
                if attempt == 2:
                    raise
                time.sleep(0.05)

    # -- hooks placed in this run ------------------------------------------------------------------
    @property
    def sink(self):
        if self._sink is None:
            from .store import ZarrSink
            self._sink = ZarrSink(self.rank_root / layout.DATA_DIR, **self._sink_options)
        return self._sink

    def _add(self, hook: _RecordingHook) -> _RecordingHook:
        if hook.name in self._hooks:
            raise ValueError(f"a hook named {hook.name!r} is already part of this run")
        # resuming, a hook that never reached a boundary is cut back to nothing ({})
        hook.bind(rank=self.rank, resume_point=None if self._resume_points is None
                  else self._resume_points.get(hook.name, {}))
        self._hooks[hook.name] = hook
        return hook

    def logging_hook(self, name: str = "log", **kwargs: Any) -> LoggingHook:
        """A CSV ``LoggingHook`` writing ``logs/<name>/rank-XXXXX.csv`` of this run."""
        kwargs.setdefault("backend", "csv")
        return self._add(LoggingHook(log_path=self.rank_root / layout.LOGS_DIR / name, name=name, **kwargs))

    def snapshot_hook(self, name: str = "snapshots", **kwargs: Any) -> SnapshotHook:
        return self._add(SnapshotHook(self.sink, name=name, **kwargs))

    def converged_hook(self, name: str = "converged", **kwargs: Any) -> ConvergedSnapshotHook:
        """The per-rank converged hook; its records are merged into ``data.zarr/converged``."""
        return self._add(ConvergedSnapshotHook(self.sink, name=name, **kwargs))

    # -- the boundary hook -------------------------------------------------------------------------
    def __call__(self, ctx: Any, stage: Any = None) -> None:
        if stage is not None and not stage_matches(Stage.BEFORE_STEP, stage):
            return
        step = int(getattr(ctx, "step_count", 0))
        self._next_step = step
        if self.world_size == 1 and self._signal is not None:
            self._stop(self.checkpoint(step))  # not final: the run is interrupted, not finished
        if self.checkpoint_every and step > self.start_step and step % self.checkpoint_every == 0:
            summary = self.checkpoint(step)
            if summary["stop"] is not None:
                self._stop(summary)

    def _stop(self, summary: dict) -> None:
        """After a boundary that a signal asked for: close the hooks and leave with ``Preempted``."""
        self._closed = True
        for hook in self._hooks.values():
            hook.close()
        self._restore_signal_handlers()
        raise Preempted(summary["stop"] or signal.SIGTERM)

    def checkpoint(self, step: int | None = None, *, final: bool = False) -> dict:
        """Commit a boundary now; every rank must call it at the same point of the run. ``step`` is the
        step a resumed run restarts at (everything recorded before it is committed). Returns the
        summary the coordinator broadcast: ``index``, ``all_final`` and ``stop`` (a signal number when
        any rank was asked to stop, else None)."""
        step = self._next_step if step is None else step
        t0 = time.perf_counter()
        self._join_coordinator()  # the previous boundary's merge and manifest come first
        record = self._commit_record(step, final)
        t1 = time.perf_counter()
        records = self.comm.gather(record, root=0, timeout=self.timeout)
        summary = None
        if self.rank == 0:
            stops = [r["signal"] for r in records if r["signal"] is not None]
            summary = {"index": self._boundary_index, "all_final": all(r["final"] for r in records),
                       "stop": stops[0] if stops else None}
        summary = self.comm.broadcast(summary, root=0, timeout=self.timeout)
        t2 = time.perf_counter()
        if self.rank == 0:
            # the merge and the manifest run beside the simulation: nobody waits for them, and the next
            # boundary (or close) joins them first, so boundaries still commit in order
            self._coord_thread = threading.Thread(target=self._coordinate_safely, args=(records, summary),
                                                  name="dist_hooks-coordinator", daemon=True)
            self._coord_thread.start()
            if final or summary["stop"] is not None or self._signal is not None:
                self._join_coordinator()
        self._boundary_index = summary["index"] + 1
        self._prune_states()
        t3 = time.perf_counter()
        # where a boundary's time goes (benchmarks/bench_boundary.py reports it): making this rank's
        # data durable and agreeing with the others stall the caller; rank 0's merge and manifest run
        # in the background (``last_coordinate_s``)
        self.last_timing = {"sync_s": t1 - t0, "exchange_s": t2 - t1, "stall_s": t3 - t0,
                            "record_bytes": len(json.dumps(record))}
        return summary

    def _coordinate_safely(self, records: list[dict], summary: dict) -> None:
        try:
            t = time.perf_counter()
            self._coordinate(records, summary)
            self.last_coordinate_s = time.perf_counter() - t
        except BaseException as exc:  # noqa: BLE001 - re-raised in the simulation thread
            self._coord_error = exc

    def _join_coordinator(self) -> None:
        """Wait for the background merge of the previous boundary; re-raise its error here."""
        if self._coord_thread is not None:
            self._coord_thread.join()
            self._coord_thread = None
        if self._coord_error is not None:
            err, self._coord_error = self._coord_error, None
            raise RuntimeError(f"coordinator (rank 0) failed to commit a boundary of {self.path}: "
                               f"{type(err).__name__}: {err}; the previous boundary stays in force") from err

    def close(self, step: int | None = None) -> None:
        """Final boundary, at ``step`` (default: the step after the last one this run saw, i.e. the
        next step that would run). A rank that finishes early keeps joining the others' boundaries
        until every rank has finished, so nobody waits for it in vain."""
        if self._closed:
            return
        self._closed = True
        if step is None:
            step = self.start_step if self._next_step is None else self._next_step + 1
        try:
            while True:
                summary = self.checkpoint(step, final=True)
                if summary["all_final"]:
                    break
        finally:
            for hook in self._hooks.values():
                hook.close()
            self._restore_signal_handlers()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or exc_type is Preempted:
            self.close()
        else:
            for hook in self._hooks.values():  # keep what is there; the next boundary never came
                try:
                    hook.close()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
        return False

    # -- one rank's part -----------------------------------------------------------------------------
    def _commit_record(self, step: int | None, final: bool) -> dict:
        hooks: dict[str, dict] = {}
        for name, hook in self._hooks.items():
            info = hook.sync()
            if not info:
                info = dict(getattr(hook, "_resume_point", {}) or {})
            if info:
                info["kind"] = hook.commit_kind
                info["converged"] = hook.merges_converged
                hooks[name] = _relative(info, self.rank_root)
        record = {"rank": self.rank, "step": step, "final": final, "signal": self._signal, "time": time.time(),
                  "hooks": hooks}
        if self.state_fn is not None:
            record["state"] = self._save_state(step)
        if self.storage == "local":
            record["converged_data"] = self._new_converged_payload(hooks)
        return record

    def _save_state(self, step: int | None) -> dict:
        d = self.rank_root / STATE_DIR / layout.rank_name(self.rank)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"step": step, "state": self.state_fn()}, buf)
        data = buf.getvalue()
        path = d / f"b-{self._boundary_index:06d}.pt"
        atomic_write_bytes(path, data)
        return {"path": str(path.relative_to(self.rank_root)), "bytes": len(data), "crc32": zlib.crc32(data)}

    def _prune_states(self) -> None:
        d = self.rank_root / STATE_DIR / layout.rank_name(self.rank)
        if not d.is_dir():
            return
        files = sorted(d.glob("b-*.pt"))
        for f in files[:-KEEP_STATES]:
            f.unlink(missing_ok=True)

    def _new_converged_payload(self, hooks: dict[str, dict]) -> dict:
        from .store.group_reader import GroupReader
        out = {}
        prev = self._prev_hooks
        for name, info in hooks.items():
            if not info["converged"] or not info.get("records"):
                continue
            start = prev.get(name, {}).get("records", 0)
            if info["records"] > start:
                reader = GroupReader(self.rank_root / layout.DATA_DIR, layout.hook_group(self.rank, name))
                block = reader.records(start, info["records"])
                out[name] = {"levels": {k: v[0] for k, v in reader.fields.items()}, **_encode_arrays(block)}
        self._prev_hooks = hooks
        return out

    # -- the coordinator's part (rank 0) -------------------------------------------------------------
    def _coordinate(self, records: list[dict], summary: dict) -> None:
        prev = self.manifest.get("last") if self.manifest else None
        merged = self._merge_converged(records, prev)
        entry = {"index": summary["index"], "time": time.time(), "all_final": summary["all_final"],
                 "steps": [r["step"] for r in records], "ranks": [{k: v for k, v in r.items()
                                                                   if k != "converged_data"} for r in records],
                 "merged": merged}
        bfile = self.path / BOUNDARIES_DIR / f"b-{summary['index']:06d}.json"
        bfile.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(bfile, json.dumps(entry, indent=1).encode())
        m = self.manifest or self._new_manifest()
        m["boundaries"].append({"index": entry["index"], "time": entry["time"], "steps": _step_range(entry["steps"]),
                                "file": str(bfile.relative_to(self.path)),
                                "converged_count": merged["records"], "all_final": entry["all_final"]})
        m["hooks"] = {name: _hook_settings(h) for name, h in self._hooks.items()}
        m["last"] = entry
        if os.environ.get("DIST_HOOKS_FAULT_BEFORE_MANIFEST") == str(entry["index"]):
            os.kill(os.getpid(), signal.SIGKILL)  # test fault injection: die just before the commit point
        self._write_manifest(m)
        self._consolidate_metadata()

    def _merge_converged(self, records: list[dict], prev: dict | None) -> dict:
        """Append the converged records committed since ``prev`` by all ranks to the merged group."""
        from .store.group_reader import GroupReader
        prev_ranks = {r["rank"]: r for r in (prev or {}).get("ranks", [])}
        parts, levels = [], {}
        for rec in records:
            r = rec["rank"]
            for name, info in rec["hooks"].items():
                if not info.get("converged"):
                    continue
                start = prev_ranks.get(r, {}).get("hooks", {}).get(name, {}).get("records", 0)
                stop = info.get("records", 0)
                if stop <= start:
                    continue
                if self.storage == "local":
                    payload = rec["converged_data"][name]
                    block = _decode_arrays(payload)
                    levels.update(payload["levels"])
                else:
                    reader = GroupReader(self.path / layout.DATA_DIR, layout.hook_group(r, name),
                                         limit_records=stop)
                    if len(reader) < stop:
                        raise RuntimeError(f"rank {r} committed {stop} records in {name!r} but only "
                                           f"{len(reader)} are visible under {self.path}: storage='shared' "
                                           "needs one filesystem that every rank writes and rank 0 reads")
                    block = reader.records(start, stop)
                    levels.update({k: v[0] for k, v in reader.fields.items()})
                block["rank"] = np.full(stop - start, r, dtype=np.int64)
                levels["rank"] = "record"
                parts.append(block)
        writer = self._merged()
        if parts:
            block = _concat_blocks(parts)
            order = np.lexsort((block["sample_id"], block["rank"], block["step"]))
            keys = list(zip(block["rank"][order].tolist(), block["sample_id"][order].tolist()))
            fresh = []
            for i, k in zip(order.tolist(), keys):  # de-duplicate on (rank, sample_id); a few per boundary
                if k not in self._merged_keys:
                    self._merged_keys.add(k)
                    fresh.append(i)
            if fresh:
                recs, atoms, n_atoms = _take(block, np.asarray(fresh, dtype=np.int64), levels)
                writer.append(recs, atoms, n_atoms)
        writer.sync()  # durable (fsync) before run.json names these lengths
        return dict(writer.committed_lengths())

    def _merged(self):
        if self._merged_writer is None:
            from .store.group_writer import GroupWriter
            self._merged_writer = GroupWriter(self.path / layout.DATA_DIR, layout.CONVERGED_GROUP,
                                              **{k: v for k, v in self._sink_options.items()
                                                 if k in ("chunk_records", "chunk_atoms", "compressor")})
        return self._merged_writer

    def _consolidate_metadata(self) -> None:
        import warnings
        import zarr
        from .store.atomic_store import AtomicLocalStore
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                zarr.consolidate_metadata(AtomicLocalStore(self.path / layout.DATA_DIR))
            except Exception as exc:  # noqa: BLE001 - live readers open without it; say so and go on
                log.warning("consolidating metadata of %s failed: %s", self.path, exc)

    # -- manifest ------------------------------------------------------------------------------------
    def _new_manifest(self) -> dict:
        from . import __version__
        return {"format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION,
                "dist_hooks_version": __version__, "created": time.time(), "world_size": self.world_size,
                "launcher": self.launch.launcher, "job_id": self.launch.job_id, "storage": self.storage,
                "checkpoint_every": self.checkpoint_every, "settings": self.settings, "hooks": {},
                "boundaries": [], "last": None}

    def _write_manifest(self, m: dict) -> None:
        atomic_write_bytes(self.path / layout.MANIFEST, json.dumps(m, indent=1).encode())
        sync_dir(self.path)
        self.manifest = m

    # -- resume --------------------------------------------------------------------------------------
    def _prepare_resume(self, manifest: dict) -> None:
        if manifest.get("format") != layout.FORMAT_NAME or manifest.get("format_version") != layout.FORMAT_VERSION:
            raise ResumeError(f"{self.path}/run.json is format {manifest.get('format')!r} version "
                              f"{manifest.get('format_version')}; this dist_hooks reads version {layout.FORMAT_VERSION}")
        if manifest["world_size"] != self.world_size:
            raise ResumeError(
                f"{self.path} was recorded with world size {manifest['world_size']}, this job has {self.world_size}: "
                "each rank continues its own shards and simulation state, so a resume needs the same world size")
        last = manifest.get("last")
        self._boundary_index = len(manifest["boundaries"])
        mine = next((r for r in (last or {}).get("ranks", []) if r["rank"] == self.rank), None)
        self._resume_points = {name: _absolute(info, self.rank_root) for name, info in (mine or {}).get("hooks", {}).items()}
        if mine is not None:
            self.start_step = int(mine["step"] or 0)
            self._prev_hooks = mine.get("hooks", {})
            if "state" in mine:
                self.resume_state = _load_state(self.rank_root, mine["state"])
        if self.rank == 0:
            merged = (last or {}).get("merged", {"records": 0, "atoms": 0})
            w = self._merged()
            w.truncate(merged.get("records", 0), merged.get("atoms", 0))
            if merged.get("records", 0):
                from .store.group_reader import GroupReader
                rd = GroupReader(self.path / layout.DATA_DIR, layout.CONVERGED_GROUP)
                self._merged_keys = set(zip(rd.column("rank").tolist(), rd.column("sample_id").tolist()))

    # -- signals -------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("rank %d: received signal %d; the run stops after the next %s", self.rank, signum,
                    "step's boundary" if self.world_size == 1 else "checkpoint boundary")
        self._signal = signum

    def _restore_signal_handlers(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):
                pass


def _step_range(steps: list[int | None]) -> list[int | None]:
    """``[min, max]`` of the ranks' boundary steps (``[None, None]`` when no rank saw a step)."""
    known = [s for s in steps if s is not None]
    return [min(known), max(known)] if known else [None, None]


def _read_manifest(path: Path) -> dict | None:
    f = path / layout.MANIFEST
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{f} is not valid JSON ({exc}); it is written atomically, so it was damaged after "
                          "the fact") from exc


def _relative(info: dict, root: Path) -> dict:
    out = dict(info)
    if "path" in out:
        p = Path(out["path"])
        out["path"] = str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else str(p)
    return out


def _absolute(info: dict, root: Path) -> dict:
    out = dict(info)
    if "path" in out and not Path(out["path"]).is_absolute():
        out["path"] = str(root / out["path"])
    return out


def _load_state(root: Path, info: dict) -> Any:
    path = root / info["path"]
    data = path.read_bytes()
    if len(data) != info["bytes"] or zlib.crc32(data) != info["crc32"]:
        raise ResumeError(f"{path}: saved simulation state does not match its checksum in run.json")
    return torch.load(io.BytesIO(data), weights_only=False)["state"]


def _hook_settings(hook: _RecordingHook) -> dict:
    return {"type": type(hook).__name__, "frequency": hook.frequency, "stage": getattr(hook.stage, "name", str(hook.stage))}


def _encode_arrays(block: dict[str, np.ndarray]) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **block)
    return {"npz_b64": base64.b64encode(buf.getvalue()).decode()}


def _decode_arrays(obj: dict) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(obj["npz_b64"]))) as z:
        return {k: z[k] for k in z.files}


def _take(block: dict[str, np.ndarray], idx: np.ndarray, levels: dict[str, str]):
    """Records ``idx`` (in that order) of a CSR block: record columns, their atom rows, atom counts."""
    ptr = block[layout.ATOMS_PTR]
    counts = (ptr[1:] - ptr[:-1])[idx]
    starts = ptr[:-1][idx]
    # atom row indices of the chosen records, in order, without a Python loop over records
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    rows = offsets + np.arange(int(counts.sum()), dtype=np.int64)
    recs = {k: np.ascontiguousarray(v[idx]) for k, v in block.items()
            if k != layout.ATOMS_PTR and levels.get(k) == "record"}
    atoms = {k: np.ascontiguousarray(v[rows]) for k, v in block.items()
             if k != layout.ATOMS_PTR and levels.get(k) == "atom"}
    return recs, atoms, counts.astype(np.int64)


def _concat_blocks(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate record blocks (each with its own 0-based atoms_ptr) into one."""
    out: dict[str, np.ndarray] = {}
    ptrs = [p[layout.ATOMS_PTR] for p in parts]
    shifts = np.cumsum([0] + [int(p[-1]) for p in ptrs[:-1]])
    out[layout.ATOMS_PTR] = np.concatenate([ptrs[0][:1]] + [p[1:] + s for p, s in zip(ptrs, shifts)])
    for k in parts[0]:
        if k != layout.ATOMS_PTR:
            out[k] = np.concatenate([p[k] for p in parts])
    return out

"""Zarr store: bytes written by GroupWriter, read back and compared with an independent reference.

The reference is the plain concatenation of what was appended; it never goes through the writer.
Arrays are read back both through ``GroupReader`` and straight through zarr.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_hooks.errors import SchemaChangedError
from dist_hooks.store import (
    AtomicLocalStore,
    GroupReader,
    GroupWriter,
    ZarrSink,
    atomic_write_bytes,
    layout,
    remove_stale_temporaries,
)
from dist_hooks.store import atomic_store as atomic_store_mod
from dist_hooks.store import staged_array
from store_helpers import list_shards, pending_sync

GROUP = layout.hook_group(0, "snap")
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers
def make_batch(rng: np.random.Generator, k: int, r_lo: int = 1, r_hi: int = 17,
               a_lo: int = 8, a_hi: int = 64):
    """One append: R records (1-17) of 8-64 atoms, float32/float64/int64/bool, NaN and inf."""
    R = int(rng.integers(r_lo, r_hi + 1))
    n = rng.integers(a_lo, a_hi + 1, R).astype(np.int64)
    A = int(n.sum())
    energy = rng.normal(size=R)
    energy[rng.random(R) < 0.1] = np.nan
    energy[rng.random(R) < 0.05] = np.inf
    pos = rng.normal(size=(A, 3)).astype(np.float32)
    pos[rng.random((A, 3)) < 0.01] = np.nan
    pos[rng.random((A, 3)) < 0.005] = -np.inf
    rec = {
        "step": np.full(R, k, np.int64),
        "sample_id": rng.integers(0, 2**40, R),
        "energy": energy,
        "cell": rng.normal(size=(R, 3, 3)).astype(np.float32),
        "pbc": rng.random((R, 3)) < 0.5,
    }
    at = {
        "positions": pos,
        "forces": rng.normal(size=(A, 3)),
        "atomic_numbers": rng.integers(1, 100, A),
        "fixed": rng.random(A) < 0.3,
    }
    return rec, at, n


class Reference:
    """The independent expectation: everything appended, concatenated."""

    def __init__(self) -> None:
        self.rec: dict[str, list[np.ndarray]] = {}
        self.at: dict[str, list[np.ndarray]] = {}
        self.n: list[np.ndarray] = []

    def add(self, rec, at, n) -> None:
        for k, v in rec.items():
            self.rec.setdefault(k, []).append(np.array(v, copy=True))
        for k, v in at.items():
            self.at.setdefault(k, []).append(np.array(v, copy=True))
        self.n.append(np.array(n, copy=True))

    def column(self, name: str) -> np.ndarray:
        src = self.rec if name in self.rec else self.at
        return np.concatenate(src[name])

    def ptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.concatenate(self.n))]).astype(np.int64)

    def prefix(self, n_appends: int) -> Reference:
        out = Reference()
        for i in range(n_appends):
            out.add({k: v[i] for k, v in self.rec.items()}, {k: v[i] for k, v in self.at.items()},
                    self.n[i])
        return out


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical comparison (NaN payloads and positions included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")))
    return bool(np.array_equal(a, b))


def assert_group_matches(root: Path, ref: Reference, group: str = GROUP) -> None:
    # 1. straight through zarr, no dist_hooks code involved, no consolidated metadata
    g = zarr.open_group(str(root), path=group, mode="r", use_consolidated=False)
    assert bits_equal(g[layout.ATOMS_PTR][:], ref.ptr())
    for name in [*ref.rec, *ref.at]:
        assert bits_equal(g[name][:], ref.column(name)), name
    # 2. through the reader: columns, bulk slices (rebased ptr) and single records
    rd = GroupReader(root, group)
    ptr = ref.ptr()
    assert len(rd) == len(ptr) - 1
    assert bits_equal(rd.atoms_ptr(), ptr)
    for name in [*ref.rec, *ref.at]:
        assert bits_equal(rd.column(name), ref.column(name)), name
    if len(rd) >= 3:
        s, e = 1, len(rd) - 1
        bulk = rd.records(s, e)
        assert bits_equal(bulk[layout.ATOMS_PTR], ptr[s:e + 1] - ptr[s])
        for name in ref.rec:
            assert bits_equal(bulk[name], ref.column(name)[s:e]), name
        for name in ref.at:
            assert bits_equal(bulk[name], ref.column(name)[ptr[s]:ptr[e]]), name
        for i in (0, len(rd) // 2, len(rd) - 1):
            one = rd.record(i, as_torch=False)
            for name in ref.rec:
                assert bits_equal(one[name], ref.column(name)[i]), name
            for name in ref.at:
                assert bits_equal(one[name], ref.column(name)[ptr[i]:ptr[i + 1]]), name


# Small chunks so that chunks and shards are completed across appends (an append brings ~9
# records and ~330 atoms; a shard holds 128 records / 2048 atoms). zarr costs ~2 ms per array
# write or read whatever its size, so the sizes also bound the test time. Uncompressed by
# default, compressed variants below; fsync is tested on its own, here it would only add time.
SMALL = dict(chunk_records=32, chunk_atoms=512, chunks_per_shard=4, compressor="none",
             fsync="never")
REC_CHUNK, ATOM_CHUNK, PER_SHARD = 32, 512, 4


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("cfg, n_appends", [
    (dict(SMALL), 300),
    (dict(SMALL, compressor="zstd"), 60),
    (dict(SMALL, compressor="blosc", chunk_records=5, chunk_atoms=100), 30),
    (dict(SMALL, write_unit="chunk"), 40),
    (dict(SMALL, chunks_per_shard=0), 60),
], ids=["shard-unit", "zstd", "blosc-odd-sizes", "chunk-unit", "unsharded"])
def test_round_trip_variable_sizes(tmp_path: Path, cfg: dict, n_appends: int) -> None:
    rng = np.random.default_rng(1)
    ref = Reference()
    w = GroupWriter(tmp_path, GROUP, **cfg)
    flush_at = set(rng.choice(n_appends, n_appends // 12, replace=False).tolist())
    for k in range(n_appends):
        rec, at, n = make_batch(rng, k)
        w.append(rec, at, n)
        ref.add(rec, at, n)
        # the writer copies: the caller may reuse its buffers at once
        at["positions"][:] = 12345.0
        rec["energy"][:] = -1.0
        if k in flush_at:
            w.flush()
            assert w.committed_lengths() == w.lengths
    assert w.lengths == {"records": len(ref.ptr()) - 1, "atoms": int(ref.ptr()[-1])}
    w.close()
    assert_group_matches(tmp_path, ref)
    # a partial tail written at flush, then completed by later appends, ends up correct
    rd = GroupReader(tmp_path, GROUP)
    assert rd.fields["positions"] == ("atom", np.dtype("float32"), (3,))
    assert rd.fields["pbc"] == ("record", np.dtype(bool), (3,))
    g = zarr.open_group(str(tmp_path), path=GROUP, mode="r")
    assert g.attrs["format"] == layout.FORMAT_NAME
    assert g.attrs["format_version"] == layout.FORMAT_VERSION
    assert g.attrs["level"]["positions"] == "atom" and g.attrs["level"]["energy"] == "record"


def test_zero_record_append_is_noop_and_input_checks(tmp_path: Path) -> None:
    w = GroupWriter(tmp_path, GROUP, **SMALL)
    w.append({"e": np.zeros(0)}, {"x": np.zeros((0, 3))}, np.zeros(0, np.int64))
    assert w.lengths == {"records": 0, "atoms": 0} and w.fields == {}
    rec, at, n = make_batch(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="positions"):
        w.append(rec, {**at, "positions": at["positions"][1:]}, n)
    with pytest.raises(ValueError, match="energy"):
        w.append({**rec, "energy": rec["energy"][:-1]}, at, n)
    with pytest.raises(ValueError, match="unique"):
        w.append({**rec, "forces": rec["energy"]}, at, n)
    w.append(rec, at, n)
    w.append(rec, at, np.zeros(0, np.int64))  # R=0 after the schema is fixed: still a no-op
    assert w.lengths["records"] == len(n)
    del w  # never flushed: a restarted writer finds the schema and nothing committed
    w = GroupWriter(tmp_path, GROUP)
    assert w.lengths == w.committed_lengths() == {"records": 0, "atoms": 0}
    assert set(w.fields) == {*rec, *at}
    w.append(rec, at, n)
    w.close()
    ref = Reference()
    ref.add(rec, at, n)
    assert_group_matches(tmp_path, ref)


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("flush_before_close", [True, False])
def test_reopen_and_continue_equals_one_writer(tmp_path: Path, flush_before_close: bool) -> None:
    rng = np.random.default_rng(2)
    batches = [make_batch(rng, k) for k in range(80)]
    one = tmp_path / "one"
    w = GroupWriter(one, GROUP, **SMALL)
    for b in batches:
        w.append(*b)
    w.close()

    two = tmp_path / "two"
    sink = ZarrSink(two, chunk_records=REC_CHUNK, chunk_atoms=ATOM_CHUNK, chunks_per_shard=PER_SHARD,
                    compressor="none", fsync="never")
    w = sink.writer(0, "snap")
    for b in batches[:45]:
        w.append(*b)
    w.flush()  # committed: 45 appends; the tail unit is partial on disk
    for b in batches[45:50]:
        w.append(*b)
    if flush_before_close:
        w.close()
        resume_from = 50
    else:
        resume_from = 45  # appends 45-49 were never flushed: a crash loses them
        committed = w.committed_lengths()
        del w
    # a restarted writer: different settings are ignored for existing arrays (alignment)
    w = GroupWriter(two, GROUP, chunk_records=5, chunk_atoms=7)
    if not flush_before_close:
        w.truncate(committed["records"], committed["atoms"])
    for b in batches[resume_from:]:
        w.append(*b)
    w.close()
    ref = Reference()
    for b in batches:
        ref.add(*b)
    assert_group_matches(one, ref)
    assert_group_matches(two, ref)
    for name in ref.rec:
        a1 = zarr.open_array(str(one / GROUP / name), mode="r")
        a2 = zarr.open_array(str(two / GROUP / name), mode="r")
        assert a1.chunks == a2.chunks == (REC_CHUNK, *a1.shape[1:])


def test_truncate_then_append(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    batches = [make_batch(rng, k) for k in range(80)]
    extra = [make_batch(rng, 1000 + k) for k in range(30)]
    w = GroupWriter(tmp_path, GROUP, **SMALL)
    for b in batches[:40]:
        w.append(*b)
    w.flush()
    at40 = w.committed_lengths()
    for b in batches[40:80]:
        w.append(*b)
    w.flush()
    # truncate back across on-disk whole shards
    w.truncate(at40["records"], at40["atoms"])
    assert w.lengths == at40 and w.committed_lengths() == at40
    for b in extra[:10]:
        w.append(*b)
    # truncate inside the in-memory buffer (nothing of it flushed)
    mid = w.lengths
    for b in extra[10:15]:
        w.append(*b)
    w.truncate(mid["records"], mid["atoms"])
    for b in extra[15:]:
        w.append(*b)
    w.close()
    ref = Reference()
    for b in batches[:40] + extra[:10] + extra[15:]:
        ref.add(*b)
    assert_group_matches(tmp_path, ref)

    # resume path: new writer, truncate to an earlier committed length, continue
    w = GroupWriter(tmp_path, GROUP)
    n_rec = int(sum(len(b[2]) for b in batches[:20]))
    n_at = int(sum(b[2].sum() for b in batches[:20]))
    with pytest.raises(ValueError, match="atoms_ptr"):
        w.truncate(n_rec, n_at + 1)
    w.truncate(n_rec, n_at)
    for b in extra:
        w.append(*b)
    w.close()
    ref = Reference()
    for b in batches[:20] + extra:
        ref.add(*b)
    assert_group_matches(tmp_path, ref)
    # no chunk/shard files past the shrunk shapes were left behind
    rd = GroupReader(tmp_path, GROUP)
    outer = REC_CHUNK * PER_SHARD
    files = os.listdir(tmp_path / GROUP / "step")
    n_shards = -(-len(rd) // outer)
    assert {f for f in files if f.startswith("c.")} == {f"c.{i}" for i in range(n_shards)}


# --------------------------------------------------------------------------- schema
def test_schema_errors_name_the_field(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w = GroupWriter(tmp_path, GROUP, **SMALL)
    rec, at, n = make_batch(rng, 0)
    w.append(rec, at, n)
    before = dict(w.lengths)
    rec, at, n = make_batch(rng, 1)
    cases = [
        ({**rec, "energy": rec["energy"].astype(np.float32)}, at,
         ["energy", "float64", "float32"]),
        (rec, {**at, "positions": np.zeros((len(at["positions"]), 4), np.float32)},
         ["positions", "(3,)", "(4,)"]),
        ({**rec, "temperature": np.zeros(len(n))}, at, ["temperature", "new field"]),
        ({k: v for k, v in rec.items() if k != "cell"}, at, ["cell", "missing"]),
        (rec, {k: v for k, v in at.items() if k != "fixed"}, ["fixed", "missing"]),
    ]
    for r, a, words in cases:
        with pytest.raises(SchemaChangedError) as ei:
            w.append(r, a, n)
        msg = str(ei.value)
        for word in words:
            assert word in msg, (word, msg)
        assert isinstance(ei.value, ValueError)
        assert w.lengths == before  # a refused append changes nothing
    w.append(rec, at, n)
    w.close()
    # a reopened writer reads the schema from the arrays and enforces it too
    w = GroupWriter(tmp_path, GROUP)
    assert w.fields["cell"] == ("record", np.dtype("float32"), (3, 3))
    with pytest.raises(SchemaChangedError, match="energy"):
        w.append({**rec, "energy": rec["energy"].astype(np.int64)}, at, n)


# --------------------------------------------------------------------------- O(1) appends
class CountingStore(AtomicLocalStore):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.sets: list[str] = []
        self.gets: list[str] = []

    def with_read_only(self, read_only: bool = False):  # keep counting on the same lists
        return self

    def put_bytes(self, key, data, *, exclusive=False):  # zarr's writes and the shard files'
        self.sets.append(key)
        return super().put_bytes(key, data, exclusive=exclusive)

    async def get(self, key, prototype=None, byte_range=None):
        out = await super().get(key, prototype, byte_range)
        if out is not None:  # count real reads (zarr probes for an existing shard first)
            self.gets.append(key)
        return out

    async def delete(self, key):
        self.sets.append("DEL " + key)
        return await super().delete(key)

    def delete_sync(self, key):
        self.sets.append("DEL " + key)
        return super().delete_sync(key)


@pytest.mark.parametrize("raw", [True, False], ids=["shard-files", "zarr"])
@pytest.mark.parametrize("shards", [0, 4])
def test_appends_write_only_whole_units(tmp_path: Path, shards: int, raw: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staged_array, "RAW_SHARD_WRITES", raw)
    store = CountingStore(tmp_path)
    cr, ca = 16, 64  # 4 atoms per record: record and atom chunks complete together
    w = GroupWriter(store, GROUP, chunk_records=cr, chunk_atoms=ca,
                    chunks_per_shard=shards)
    unit = cr * (shards or 1)

    def one(k: int) -> None:
        w.append({"step": np.array([k]), "e": np.array([k + 0.5])},
                 {"x": np.full((4, 3), k, np.float32)}, np.array([4]))

    one(0)  # creates the group and the arrays (metadata only)
    assert not any("/c." in s for s in store.sets)
    store.sets.clear()
    store.gets.clear()
    # after one(k) there are k+1 records; atoms_ptr has R+1 rows, so its unit completes first
    for k in range(1, unit - 2):
        one(k)
    assert store.sets == [] and store.gets == []  # sub-unit appends touch no file at all
    one(unit - 2)  # one chunk/shard file; shapes (zarr.json) only move at flush()
    assert store.sets == [f"{GROUP}/atoms_ptr/c.0"]
    store.sets.clear()
    one(unit - 1)  # records and atoms complete their first unit
    assert sorted(store.sets) == sorted([f"{GROUP}/step/c.0", f"{GROUP}/e/c.0",
                                         f"{GROUP}/x/c.0.0"])
    assert store.gets == []  # never reads anything back (no atoms_ptr re-read, no merge)
    # readers do not see unflushed units: the persisted shapes are the committed ones
    assert zarr.open_array(str(tmp_path / GROUP / "step"), mode="r").shape == (0,)
    # O(1) per append overall: one file per array per completed unit, no reads at all
    store.sets.clear()
    n_more = 10 * unit
    for k in range(unit, unit + n_more):
        one(k)
    assert len(store.sets) == 4 * n_more // unit
    assert store.gets == []
    store.sets.clear()
    w.flush()  # only atoms_ptr (R+1 rows) has a partial tail; then the four shapes
    assert sorted(store.sets) == sorted(
        [f"{GROUP}/atoms_ptr/c.{(unit + n_more) // unit}"]
        + [f"{GROUP}/{n}/zarr.json" for n in ("step", "e", "x", "atoms_ptr")])
    w.close()
    ref_steps = np.arange(unit + n_more)
    g = zarr.open_group(str(tmp_path), path=GROUP, mode="r")
    assert np.array_equal(g["step"][:], ref_steps)
    assert np.array_equal(g["x"][:, 0], np.repeat(ref_steps, 4).astype(np.float32))


# --------------------------------------------------------------------------- chunks & files
def test_explicit_chunks_and_bounded_file_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    cfgs = {"sharded": dict(SMALL, compressor="zstd"),
            "plain": dict(SMALL, compressor="zstd", chunks_per_shard=0)}
    counts = {}
    for label, cfg in cfgs.items():
        root = tmp_path / label
        w = GroupWriter(root, GROUP, **cfg)
        for k in range(80):
            w.append(*make_batch(rng, k))
        w.close()
        g = zarr.open_group(str(root), path=GROUP, mode="r")
        n_rec = w.lengths["records"]
        for name, arr in g.arrays():
            level = w.fields.get(name, ("record",))[0]
            rows = ATOM_CHUNK if level == "atom" else REC_CHUNK
            assert arr.chunks == (rows, *arr.shape[1:]), name  # explicit, trailing whole
            assert arr.chunks[0] > 1
            if cfg["chunks_per_shard"]:
                assert arr.shards == (rows * PER_SHARD, *arr.shape[1:]), name
                n_files = len([f for f in os.listdir(root / GROUP / name) if f.startswith("c.")])
                assert n_files == -(-arr.shape[0] // (rows * PER_SHARD)), name
            else:
                assert arr.shards is None
            codecs = json.loads((root / GROUP / name / "zarr.json").read_text())["codecs"]
            assert "zstd" in json.dumps(codecs)
        counts[label] = sum(len(f) for _, _, f in os.walk(root))
        assert n_rec > 500
    assert counts["sharded"] * 2.5 < counts["plain"]


# --------------------------------------------------------------------------- atomicity
def test_atomic_store_write_crash_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    from zarr.core.buffer import default_buffer_prototype

    store = AtomicLocalStore(tmp_path)
    buf = default_buffer_prototype().buffer.from_bytes
    store.set_sync("arr/c.0", buf(b"committed" * 1000))

    def torn(f, view):
        f.write(view[: len(view) // 2])
        f.flush()
        raise OSError("simulated crash in the middle of a chunk write")

    monkeypatch.setattr(atomic_store_mod, "_write_payload", torn)
    with pytest.raises(OSError, match="simulated"):
        store.set_sync("arr/c.0", buf(b"NEW" * 5000))
    assert (tmp_path / "arr" / "c.0").read_bytes() == b"committed" * 1000
    assert os.listdir(tmp_path / "arr") == ["c.0"]  # the temporary was removed
    # a hard kill leaves the temporary behind: it is invisible to zarr and cleaned on reopen
    stale = tmp_path / "arr" / f".c.0.{'ab' * 16}.tmp"
    stale.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == 1 and not stale.exists()
    # zarr listings (group members, readers) never show such a temporary
    monkeypatch.undo()
    w = GroupWriter(tmp_path / "z", GROUP, **SMALL)
    w.append(*make_batch(np.random.default_rng(0), 0))
    w.close()
    (tmp_path / "z" / GROUP / f".zarr.json.{'cd' * 16}.tmp").write_bytes(b"{")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about unrecognised nodes in a listing
        g = zarr.open_group(AtomicLocalStore(tmp_path / "z", read_only=True), mode="r")
        assert {n for n, _ in g.members(max_depth=None)} >= {GROUP, f"{GROUP}/positions"}
        assert len(GroupReader(tmp_path / "z", GROUP)) > 0


def test_atomic_store_fsync_policy(tmp_path: Path, monkeypatch) -> None:
    from zarr.core.buffer import default_buffer_prototype

    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    buf = default_buffer_prototype().buffer.from_bytes
    store = AtomicLocalStore(tmp_path, fsync="replace")
    store.set_sync("a/c.0", buf(b"x"))
    assert calls == []  # a new file cannot hurt committed data: deferred to sync()
    store.set_sync("a/c.0", buf(b"y"))
    assert len(calls) == 1  # replacing a file that may hold committed data: fsync first
    assert pending_sync(store) > 0
    calls.clear()
    store.sync()
    assert len(calls) >= 2 and pending_sync(store) == 0  # the file, then its directories
    calls.clear()
    store.sync()
    assert calls == []
    atomic_write_bytes(tmp_path / "run.json", b"{}")
    assert (tmp_path / "run.json").read_bytes() == b"{}" and len(calls) == 2


CHILD = textwrap.dedent("""
    import json, os, sys, threading, types
    import numpy as np
    # load dist_hooks.store without the package __init__ (which imports torch): ~0.5 s per child
    pkg = types.ModuleType("dist_hooks")
    pkg.__path__ = [os.path.join({repo!r}, "dist_hooks")]
    sys.modules["dist_hooks"] = pkg
    from dist_hooks.store import GroupWriter, atomic_write_bytes
    from dist_hooks.store import atomic_store
    GROUP, SMALL = {group!r}, {small!r}
    root, kill = sys.argv[1], sys.argv[2]
    # kill = "N": die in the N-th file write; "replace:N": in the N-th rewrite of an existing
    # chunk/shard file (the write that could tear committed data if it were not atomic)
    only_replace = kill.startswith("replace:")
    kill_at = int(kill.split(":")[-1])
    calls = [0, 0]
    lock = threading.Lock()  # zarr writes arrays from several threads at once
    real = atomic_store._write_payload
    def payload(f, view):
        d, tmp = os.path.split(f.name)
        target = os.path.join(d, tmp[1:].rsplit(".", 2)[0])
        replace = os.path.exists(target) and not target.endswith(".json")
        with lock:
            calls[0] += 1
            calls[1] += replace
            hit = (replace and calls[1] == kill_at) if only_replace else calls[0] == kill_at
        if hit:
            f.write(view[: len(view) // 2]); f.flush(); os._exit(17)  # hard kill mid-write
        return real(f, view)
    atomic_store._write_payload = payload
""")
CHILD_MAIN = textwrap.dedent("""
    rng = np.random.default_rng(7)
    w = GroupWriter(root, GROUP, **SMALL)
    for k in range(45):
        w.append(*make_batch(rng, k))
        if k % 7 == 6:
            w.sync()
            atomic_write_bytes(os.path.join(root, "committed.json"),
                               json.dumps(w.committed_lengths()).encode())
    w.close()
    print("writes", calls[0], calls[1])
""")


def test_kill_at_any_write_keeps_committed_data(tmp_path: Path) -> None:
    """A process killed mid-write (no exception handlers run) never loses committed records:
    a restarted writer truncates to the last committed lengths and continues to the same bytes."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), group=GROUP, small=SMALL)
                      + textwrap.dedent(inspect.getsource(make_batch)) + CHILD_MAIN)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    full = subprocess.run([sys.executable, str(script), str(tmp_path / "full"), "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == 0, full.stderr
    n_writes, n_replace = map(int, full.stdout.split()[-2:])
    rng = np.random.default_rng(7)
    batches = [make_batch(rng, k) for k in range(45)]
    ref = Reference()
    for b in batches:
        ref.add(*b)
    ptr = ref.ptr()
    assert n_writes > 50 and n_replace >= 3
    for kill_at in ("replace:1", f"replace:{n_replace}", str(n_writes // 2)):
        root = tmp_path / f"kill{kill_at.replace(':', '')}"
        p = subprocess.run([sys.executable, str(script), str(root), kill_at],
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 17, p.stderr
        cfile = root / "committed.json"
        committed = (json.loads(cfile.read_text()) if cfile.exists()
                     else {"records": 0, "atoms": 0})
        ends = np.concatenate([[0], np.cumsum([len(b[2]) for b in batches])])
        n_app = int(np.searchsorted(ends, committed["records"]))
        assert ends[n_app] == committed["records"]
        assert committed["atoms"] == ptr[committed["records"]]
        # the data on disk holds the committed prefix bit for bit, before any repair
        rd = GroupReader(root, GROUP, limit_records=committed["records"])
        assert len(rd) == committed["records"]
        if n_app:
            pre = ref.prefix(n_app)
            for name in [*ref.rec, *ref.at]:
                assert bits_equal(rd.column(name), pre.column(name)), (kill_at, name)
        # resume: reopen, truncate to committed, continue -> identical to the uninterrupted run
        w = GroupWriter(root, GROUP)
        w.truncate(committed["records"], committed["atoms"])
        for b in batches[n_app:]:
            w.append(*b)
        w.close()
        assert_group_matches(root, ref)
        assert not [f for _, _, fs in os.walk(root) for f in fs if f.endswith((".tmp", ".partial"))]


# --------------------------------------------------------------------------- readers
@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_live_reader_without_consolidated_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    run = tmp_path / "run"
    tmp_path = tmp_path / "z"
    sink = ZarrSink(tmp_path, chunk_records=REC_CHUNK, chunk_atoms=ATOM_CHUNK, chunks_per_shard=PER_SHARD)
    w = sink.writer(0, "snap", attrs={"hook": "SnapshotHook", "frequency": 10})
    w2 = sink.writer(3, "conv")
    for k in range(20):
        w.append(*make_batch(rng, k))
        w2.append(*make_batch(rng, k))
    w.flush()
    w2.flush()
    first = w.committed_lengths()["records"]
    zarr.consolidate_metadata(str(tmp_path))  # a boundary refreshes it ...
    for k in range(20, 40):
        w.append(*make_batch(rng, k))
    w.flush()  # ... and later appends make it stale
    stale = zarr.open_group(str(tmp_path), mode="r", use_consolidated=True)
    assert stale[f"{GROUP}/{layout.ATOMS_PTR}"].shape[0] == first + 1
    rd = GroupReader(tmp_path, GROUP)
    assert len(rd) == w.lengths["records"] > first
    assert rd.attrs["hook"] == "SnapshotHook" and rd.attrs["frequency"] == 10
    # committed-length limit: nothing past it is returned
    lim = GroupReader(tmp_path, GROUP, limit_records=first)
    assert len(lim) == first
    assert len(lim.column("positions")) == lim.atoms_ptr()[-1]
    with pytest.raises(IndexError):
        lim.record(first)
    t = lim.record(-1)  # torch by default
    assert t["positions"].shape[1] == 3 and str(t["positions"].dtype) == "torch.float32"
    # a live reader sees later appends after refresh()
    for k in range(40, 45):
        w.append(*make_batch(rng, k))
    w.flush()
    rd.refresh()
    assert len(rd) == w.lengths["records"]
    assert list_shards(tmp_path) == {0: ["snap"], 3: ["conv"]}
    # the run directory is accepted as well as the zarr root
    ZarrSink(run / layout.DATA_DIR).writer(1, "snap").append(*make_batch(rng, 0))
    assert list_shards(run) == {1: ["snap"]}
    assert layout.csv_path(run, "log", 2) == run / "logs" / "log" / "rank-00002.csv"


def test_file_checksums_are_those_of_the_files_on_disk(tmp_path: Path) -> None:
    """take_file_checksums() after each sync: [bytes, crc32] of exactly the atom arrays' shard
    files written since the last call, equal to zlib.crc32 of the files as they are on disk."""
    import zlib

    rng = np.random.default_rng(11)
    w = GroupWriter(tmp_path, GROUP, **SMALL)
    seen: dict[str, list[int]] = {}
    for k in range(60):
        w.append(*make_batch(rng, k))
        if k % 15 == 14:
            w.sync()
            got = w.take_file_checksums()
            assert got, "every sync after appends rewrote at least the trailing shards"
            for rel, (size, crc) in got.items():
                name, _, fname = rel.partition("/")
                assert w.fields[name][0] == "atom" and fname.startswith("c.")
                data = (tmp_path / GROUP / rel).read_bytes()
                assert [len(data), zlib.crc32(data)] == [size, crc], rel
            seen.update(got)
    assert w.take_file_checksums() == {}  # nothing written since
    w.close()
    # every atom shard file on disk was reported, and its last report is its content
    for name, (level, _, _) in w.fields.items():
        if level != "atom":
            continue
        for f in sorted(os.listdir(tmp_path / GROUP / name)):
            if f.startswith("c."):
                data = (tmp_path / GROUP / name / f).read_bytes()
                assert seen[f"{name}/{f}"] == [len(data), zlib.crc32(data)], (name, f)


def test_live_reader_reads_rewritten_shards_fresh(tmp_path: Path) -> None:
    """A reader kept open while the writer keeps appending (as the coordinator reads the ranks'
    groups) returns the new rows after refresh(), never a stale copy of a rewritten shard: every
    read equals the concatenation of what was appended."""
    rng = np.random.default_rng(12)
    ref = Reference()
    w = GroupWriter(tmp_path, GROUP, **SMALL)  # small shards: the trailing one is rewritten often
    rd = None
    for k in range(40):
        batch = make_batch(rng, k)
        w.append(*batch)
        ref.add(*batch)
        if k % 4 == 3:
            w.flush()
            if rd is None:
                rd = GroupReader(tmp_path, GROUP)
            rd.refresh()
            ptr = ref.ptr()
            assert len(rd) == len(ptr) - 1
            for name in ("positions", "forces", "energy", "cell"):
                assert bits_equal(rd.column(name), ref.column(name)), (k, name)
            last = rd.records(len(rd) - 3, len(rd))
            assert bits_equal(last["positions"], ref.column("positions")[ptr[-4]:]), k

"""Record groups written and read through an object store (``ObjectZarrStore`` on a real SeaweedFS
server, the ``s3_server`` fixture) equal the same groups in a local directory: every object's
bytes equal the local file's (read back with an independent obstore client), the readers return
the same rows, truncation and resume do the same, the commit records' file checksums agree; a
standalone ``SnapshotHook`` recording to ``ZarrSink("s3://...")`` reads back, with plain zarr and
xarray, as the batches it was given."""
from __future__ import annotations

import json
import socket
import zlib
from pathlib import Path

import numpy as np
import obstore
import pytest
import torch
import zarr
from obstore.store import S3Store

from dist_hooks import ConvergedSnapshotHook, SnapshotHook, ZarrSink
from dist_hooks.errors import DamageError, RunError
from dist_hooks.stages import Stage
from dist_hooks.store import GroupReader, GroupWriter, layout
from dist_hooks.store.atomic_store import AtomicLocalStore
from dist_hooks.store.manifest import GroupCommit
from dist_hooks.store.object_storage import ObjectRunStorage
from dist_hooks.store.object_zarr_store import ObjectZarrStore
from dist_hooks.store.storage import LocalRunStorage

from batches import Ctx, make_batch

GROUP = "ranks/rank-00000/snap"
#: small units: many shard files, partial shards, rewritten tails
CHUNKING = dict(chunk_records=8, chunk_atoms=16, chunks_per_shard=4)


def _raw(server, url: str) -> S3Store:
    """An independent client on ``url``'s prefix (not the code under test)."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return S3Store(bucket, prefix=prefix, config={k: v for k, v in server.storage_options.items()
                                                  if k != "allow_http"},
                   client_options={"allow_http": True})


def _objects(raw: S3Store) -> dict[str, bytes]:
    keys = [m["path"] for batch in obstore.list(raw) for m in batch]
    return {k: bytes(obstore.get(raw, k).bytes()) for k in keys}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _appends(seed: int, n: int) -> list[tuple[dict, dict, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        counts = rng.integers(0, 9, size=int(rng.integers(1, 7)))
        a = int(counts.sum())
        rec = {"step": np.full(len(counts), 100 * seed + i, np.int64),
               "energy": rng.normal(size=len(counts)),
               "cell": rng.normal(size=(len(counts), 3, 3)).astype(np.float32)}
        at = {"positions": rng.normal(size=(a, 3)).astype(np.float32),
              "atomic_numbers": rng.integers(1, 30, a).astype(np.int64)}
        if i % 5 == 2:
            at["positions"][:] = 0.0  # whole zero chunks, which zarr leaves out of a shard
        out.append((rec, at, counts))
    return out


def _both(s3_server, tmp_path: Path):
    """A local Zarr root and an object-store one (ObjectRunStorage's), with a raw client."""
    st = ObjectRunStorage(s3_server.new_url("zarr"), s3_server.storage_options)
    store = st.zarr_store()
    assert isinstance(store, ObjectZarrStore)
    return AtomicLocalStore(tmp_path / "data.zarr", fsync="never"), store, \
        _raw(s3_server, st.url(layout.DATA_DIR)), st


def _write(root, seed: int, n: int, *, flush_every: int = 3, **kw) -> dict:
    w = GroupWriter(root, GROUP, **{**CHUNKING, **kw})
    for i, (rec, at, counts) in enumerate(_appends(seed, n)):
        w.append(rec, at, counts)
        if i % flush_every == flush_every - 1:
            w.flush()
    w.sync()
    sums = w.take_file_checksums()
    w.close()
    return sums


@pytest.mark.parametrize("write_unit", ["shard", "chunk"])
def test_appends_give_the_same_bytes_as_on_disk(s3_server, tmp_path, write_unit):
    local, obj, raw, _ = _both(s3_server, tmp_path)
    sums_l = _write(local, 1, 20, write_unit=write_unit)
    sums_o = _write(obj, 1, 20, write_unit=write_unit)
    want, got = _files(local.root), _objects(raw)
    assert sorted(got) == sorted(want) and len(want) > 20
    assert [k for k in want if got[k] != want[k]] == []
    assert sums_o == sums_l and sums_l
    for key, (size, crc) in sums_o.items():  # the commit record's checksums: of the objects
        data = got[f"{GROUP}/{key}"]
        assert [len(data), zlib.crc32(data)] == [size, crc]


def test_whole_shards_skip_zarr_on_the_object_store(s3_server, tmp_path):
    local, obj, _, _ = _both(s3_server, tmp_path)
    for root in (local, obj):
        w = GroupWriter(root, GROUP, **CHUNKING)
        rec, at, counts = _appends(2, 1)[0]
        w.append(rec, at, counts)
        assert all(c.shard_files() is not None for c in w._all_cols())
        w.close()


@pytest.mark.parametrize("chunks_per_shard", [4, 0])  # 0: no shards, zarr reads them
def test_reader_over_the_server_equals_the_local_one(s3_server, tmp_path, chunks_per_shard):
    local, obj, _, _ = _both(s3_server, tmp_path)
    for root in (local, obj):
        _write(root, 3, 15, chunks_per_shard=chunks_per_shard)
    for limit in (None, 7, 0, 10**6):
        a = GroupReader(tmp_path / "data.zarr", GROUP, limit_records=limit)
        b = GroupReader(obj, GROUP, limit_records=limit)
        assert len(b) == len(a) and b.n_atoms == a.n_atoms and b.fields == a.fields
        assert len(a) == (min(limit, len(a)) if limit is not None else len(a))
        assert np.array_equal(b.atoms_ptr(), a.atoms_ptr())
        ra, rb = a.records(), b.records()
        assert sorted(rb) == sorted(ra)
        for k in ra:
            assert ra[k].dtype == rb[k].dtype and np.array_equal(ra[k], rb[k]), k
        # shard files read directly when sharded
        assert all((b.raw(n) is not None) == bool(chunks_per_shard) for n in b.fields)
    assert len(GroupReader(obj, GROUP, limit_records=7)) == 7
    i = len(a) // 2
    for k, v in a.record(i, as_torch=False).items():
        assert np.array_equal(b.record(i, as_torch=False)[k], v)


def test_a_live_reader_sees_a_rewritten_shard(s3_server, tmp_path):
    """The reader keeps the last shard it read and asks the server only whether it changed
    (If-None-Match): a shard the writer rewrote since is read again, an unchanged one is not."""
    _, obj, _, _ = _both(s3_server, tmp_path)
    w = GroupWriter(obj, GROUP, **CHUNKING)
    steps = []
    for rec, at, counts in _appends(4, 3):
        w.append(rec, at, counts)
        steps.append(rec["step"])
    w.flush()
    rd = GroupReader(obj, GROUP)
    reads = []
    read_version = obj.read_version

    def spy(key, known):
        got = read_version(key, known)
        reads.append((key, got is not None and got[1] is not None))
        return got

    obj.read_version = spy
    first = rd.column("step")
    assert np.array_equal(first, np.concatenate(steps)) and len(first) < 32  # one partial shard
    assert np.array_equal(rd.column("step"), first)
    key = f"{GROUP}/step/c.0"
    assert reads == [(key, True), (key, False)]  # unchanged: asked, not transferred
    rec, at, counts = _appends(5, 1)[0]
    w.append(rec, at, counts)
    w.flush()  # the same shard file, rewritten with more rows
    assert np.array_equal(rd.column("step"), first)  # the reader's length is as opened ...
    rd.refresh()  # ... until it looks again
    assert np.array_equal(rd.column("step"), np.concatenate([*steps, rec["step"]]))
    assert reads[-1] == (key, True)
    w.close()


def test_truncate_and_resume_on_the_server_equal_local(s3_server, tmp_path):
    local, obj, raw, _ = _both(s3_server, tmp_path)
    for root in (local, obj):
        _write(root, 6, 12)
        w = GroupWriter(root, GROUP, **CHUNKING)
        ptr = GroupReader(root, GROUP).atoms_ptr()
        w.truncate(9, int(ptr[9]))
        for rec, at, counts in _appends(7, 10):  # whole shards written past the shape ...
            w.append(rec, at, counts)
        del w  # ... by a writer killed before its flush: never published
        w = GroupWriter(root, GROUP, **CHUNKING)  # the resume: drops them, reloads the tail
        assert w.committed_lengths()["records"] == 9
        for rec, at, counts in _appends(8, 6):
            w.append(rec, at, counts)
        w.sync()
        w.close()
    want, got = _files(local.root), _objects(raw)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    a, b = GroupReader(local, GROUP), GroupReader(obj, GROUP)
    assert len(a) == len(b) == 9 + sum(len(c) for _, _, c in _appends(8, 6))
    assert np.array_equal(a.column("positions"), b.column("positions"))


def test_check_committed_on_the_object_store(s3_server, tmp_path):
    _, obj, _, st = _both(s3_server, tmp_path)
    _write(obj, 9, 6)
    rd = GroupReader(obj, GROUP)
    n, atoms = len(rd), rd.n_atoms
    st.check_committed(GroupCommit(GROUP, n, atoms, {}), "rank 0")
    st.check_committed(GroupCommit(GROUP, n - 1, int(rd.atoms_ptr()[n - 1]), {}), "rank 0")
    with pytest.raises(DamageError, match=rf"s3://.*{GROUP}: {n} records .* commits {n + 1}"):
        st.check_committed(GroupCommit(GROUP, n + 1, atoms + 3, {}), "rank 0")
    with pytest.raises(DamageError, match="cannot be read"):
        st.check_committed(GroupCommit("ranks/rank-00009/none", 1, 1, {}), "rank 9")
    # the local backend says the same of the same group
    local = LocalRunStorage(tmp_path / "run")
    _write(local.zarr_store(), 9, 6)
    with pytest.raises(DamageError, match=rf"{n} records .* commits {n + 1}"):
        local.check_committed(GroupCommit(GROUP, n + 1, atoms + 3, {}), "rank 0")


def test_bad_credentials_and_a_dead_endpoint_are_clear_errors(s3_server):
    opts = {**s3_server.storage_options, "secret_access_key": "wrong", "max_retries": 0}
    st = ObjectRunStorage(s3_server.new_url("bad"), opts, check=False)
    with pytest.raises(RunError, match="access denied"):
        GroupWriter(st.zarr_store(), GROUP)
    with pytest.raises(RunError, match="access denied"):
        st.zarr_store().put_bytes("x", b"1")
    with pytest.raises(RunError, match="access denied"):
        GroupReader(st.zarr_store(), GROUP)
    with pytest.raises(RunError, match="access denied"):
        ZarrSink(st.url(layout.DATA_DIR), storage_options=opts)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = {**s3_server.storage_options, "endpoint": f"http://127.0.0.1:{port}",
            "max_retries": 0}
    st = ObjectRunStorage(s3_server.new_url("dead"), dead, check=False)
    with pytest.raises(RunError, match="cannot reach the object store"):
        GroupWriter(st.zarr_store(), GROUP)


def test_snapshot_hook_records_to_the_server(s3_server, tmp_path):
    url = s3_server.new_url("sink") + "/data.zarr"
    sink = ZarrSink(url, storage_options=s3_server.storage_options, chunk_records=4,
                    chunk_atoms=32, chunks_per_shard=2)
    hook = SnapshotHook(sink, frequency=1, rank=0)
    batches = []
    for step in range(12):
        b = make_batch([3, 7, 1 + step % 4], seed=step, first_id=10 * step)
        hook(Ctx(b, step_count=step), Stage.AFTER_STEP)
        batches.append({k: v.clone() for k, v in vars(b).items()})
        if step == 5:
            hook.flush()
    hook.close()
    # plain zarr over zarr's own ObjectStore, an independent client
    plain = zarr.storage.ObjectStore(_raw(s3_server, url), read_only=True)
    g = zarr.open_group(plain, path=layout.hook_group(0, "snapshots"), mode="r",
                        use_consolidated=False)
    cat = {k: torch.cat([b[k] for b in batches]).numpy() for k in batches[0]}
    n = len(cat["energy"])
    assert g["step"].shape == (n,) and g[layout.ATOMS_PTR][-1] == len(cat["positions"])
    for k in ("positions", "velocities", "forces", "atomic_numbers", "atomic_masses"):
        assert g[k][...].tobytes() == cat[k].tobytes(), k
    assert g["energy"][...].tobytes() == cat["energy"].reshape(n).tobytes()
    assert g["cell"][...].tobytes() == cat["cell"].tobytes()
    assert np.array_equal(g["sample_id"][...], cat["system_id"][:, 0])
    assert np.array_equal(g["step"][...], np.repeat(np.arange(12), 3))
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(plain, group=layout.hook_group(0, "snapshots"), consolidated=False)
    assert ds.sizes["record"] == n and ds.sizes["atom"] == len(cat["positions"])
    assert ds["positions"].values.tobytes() == cat["positions"].tobytes()
    assert json.loads(bytes(obstore.get(_raw(s3_server, url), "zarr.json").bytes()))[
        "node_type"] == "group"


def test_converged_hook_resumed_on_the_server_writes_no_system_twice(s3_server):
    """A resumed ConvergedSnapshotHook reads the sample ids already in its group back from the
    writer's own store (no local path): converged systems are not written again."""
    url = s3_server.new_url("conv") + "/data.zarr"
    b = make_batch([4, 2, 6], seed=4)
    for step, mask in ((3, [True, False, False]), (5, [True, True, True])):
        sink = ZarrSink(url, storage_options=s3_server.storage_options, chunk_records=4,
                        chunk_atoms=32)
        hook = ConvergedSnapshotHook(sink, rank=1)
        hook(Ctx(b, step_count=step, converged_mask=torch.tensor(mask)), Stage.ON_CONVERGE)
        hook.close()
    g = zarr.open_group(zarr.storage.ObjectStore(_raw(s3_server, url), read_only=True),
                        path=layout.hook_group(1, "converged"), mode="r", use_consolidated=False)
    assert g["sample_id"][...].tolist() == [0, 1, 2] and g["step"][...].tolist() == [3, 5, 5]

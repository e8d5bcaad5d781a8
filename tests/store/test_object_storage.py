"""``ObjectRunStorage`` against a real S3 server (SeaweedFS on loopback, the ``s3_server``
fixture): every outcome is checked with an independent client (plain obstore, plain zarr) reading
the objects back, not through the class under test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import obstore  # the test extra installs it: missing is a failure, not a skip
import pytest
import zarr
from obstore.store import S3Store

from dist_hooks.errors import (CommitConflictError, DamageError, LockHeldError,
                               MissingDependencyError, RunError)
from dist_hooks.store.object_lease import precondition_failed, put_mode
from dist_hooks.store.object_storage import ObjectRunStorage, open_storage
from dist_hooks.store.storage import LocalRunStorage

HOLDER = {"host": "node-a", "pid": 4242, "job_id": "job-17", "launcher": "torchrun"}


def _raw(server, url: str) -> S3Store:
    """An independent client on the run's prefix."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return S3Store(bucket, prefix=prefix, config={k: v for k, v in server.storage_options.items()
                                                  if k != "allow_http"},
                   client_options={"allow_http": True})


def _raw_get(store: S3Store, key: str) -> bytes | None:
    try:
        return bytes(obstore.get(store, key).bytes())
    except FileNotFoundError:
        return None


def _storage(server, url: str | None = None, **kw) -> ObjectRunStorage:
    return ObjectRunStorage(url or server.new_url(), server.storage_options, **kw)


def test_read_replace_list_remove_round_trip(s3_server):
    st = _storage(s3_server)
    raw = _raw(s3_server, st.root_url)
    assert st.read("run.json") is None
    st.replace("boundaries/b-000001.json", b'{"index": 1}')
    st.replace("boundaries/b-000000.json", b'{"index": 0}')
    st.replace("boundaries/deeper/x.json", b"not listed")
    st.replace("state/rank-00000/b-000000.pt", bytes(range(256)) * 1000)
    assert _raw_get(raw, "boundaries/b-000000.json") == b'{"index": 0}'
    assert _raw_get(raw, "state/rank-00000/b-000000.pt") == bytes(range(256)) * 1000
    st.replace("boundaries/b-000000.json", b'{"index": 0, "again": true}')
    assert st.read("boundaries/b-000000.json") == b'{"index": 0, "again": true}'
    assert st.list("boundaries") == ["b-000000.json", "b-000001.json"]
    assert st.list("boundaries/") == ["b-000000.json", "b-000001.json"]
    assert st.list("nothing/here") == []
    st.remove("boundaries/b-000000.json")
    st.remove("boundaries/b-000000.json")  # a missing one is no error
    assert _raw_get(raw, "boundaries/b-000000.json") is None
    assert st.list("boundaries") == ["b-000001.json"]
    with pytest.raises(RunError, match="no local file path"):
        st.path("logs/log/rank-00000.csv")
    assert st.url("run.json") == f"{st.root_url}/run.json"


def test_credentials_from_the_environment(s3_server, monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    url = s3_server.new_url()
    st = open_storage(url)
    assert isinstance(st, ObjectRunStorage)
    st.replace("a.bin", b"via env")
    assert _raw_get(_raw(s3_server, url), "a.bin") == b"via env"


def test_first_commit_is_create_only(s3_server):
    url = s3_server.new_url()
    first, second = _storage(s3_server, url), _storage(s3_server, url)
    first.commit_manifest(b'{"writer": 1}')
    with pytest.raises(CommitConflictError, match="created by another writer"):
        second.commit_manifest(b'{"writer": 2}')  # never read run.json: may only create it
    assert _raw_get(_raw(s3_server, url), "run.json") == b'{"writer": 1}'
    first.commit_manifest(b'{"writer": 1, "boundary": 2}')  # its own version: replaced
    assert _raw_get(_raw(s3_server, url), "run.json") == b'{"writer": 1, "boundary": 2}'


def test_commit_after_another_writer_is_refused(s3_server):
    url = s3_server.new_url()
    a, b = _storage(s3_server, url), _storage(s3_server, url)
    a.commit_manifest(b'{"by": "a", "n": 0}')
    assert b.read("run.json") == b'{"by": "a", "n": 0}'
    b.commit_manifest(b'{"by": "b", "n": 1}')
    with pytest.raises(CommitConflictError, match="replaced by another writer"):
        a.commit_manifest(b'{"by": "a", "n": 1}')
    assert _raw_get(_raw(s3_server, url), "run.json") == b'{"by": "b", "n": 1}'
    assert a.read("run.json") == b'{"by": "b", "n": 1}'  # reading adopts the version read
    a.commit_manifest(b'{"by": "a", "n": 2}')
    with pytest.raises(CommitConflictError):
        b.commit_manifest(b'{"by": "b", "n": 2}')
    assert _raw_get(_raw(s3_server, url), "run.json") == b'{"by": "a", "n": 2}'


def test_second_holder_is_refused_naming_the_first(s3_server):
    url = s3_server.new_url()
    a, b = _storage(s3_server, url), _storage(s3_server, url)
    lease = a.lock(HOLDER)
    doc = json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))
    assert doc["holder"] == HOLDER and doc["expires"] > time.time()
    with pytest.raises(LockHeldError, match="host node-a, pid 4242, job id job-17"):
        b.lock({"host": "node-b", "pid": 1})
    lease.release()
    lease.release()
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["released"]
    b.lock({"host": "node-b", "pid": 1}).release()  # a released lease is free at once
    with pytest.raises(CommitConflictError, match="lease of the run is lost"):
        lease.check()


def test_holder_whose_lease_was_taken_over_cannot_commit(s3_server):
    url = s3_server.new_url()
    st = _storage(s3_server, url, lease_s=0.9)
    lease = st.lock(HOLDER)
    st.commit_manifest(b'{"n": 0}')
    other = {"holder": {"host": "node-b"}, "token": "x" * 32, "lease_s": 30.0,
             "expires": time.time() + 30}
    obstore.put(_raw(s3_server, url), ".run.lock", json.dumps(other).encode())
    deadline = time.monotonic() + 10
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the next renewal (every 0.3 s) finds another job's lease
    assert lease.lost is not None and "node-b" in lease.lost
    with pytest.raises(CommitConflictError, match="node-b"):
        st.commit_manifest(b'{"n": 1}')
    assert _raw_get(_raw(s3_server, url), "run.json") == b'{"n": 0}'
    lease.release()  # not ours: left as the other job wrote it
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock")) == other


_HOLD = """
import sys, time
from dist_hooks.store.object_storage import ObjectRunStorage
st = ObjectRunStorage(sys.argv[1], lease_s=float(sys.argv[2]))
lease = st.lock({"host": "node-dead", "pid": 1, "job_id": "crashed"})
print("held", flush=True)
time.sleep(600)
"""


def _holder_killed(server, url: str, script: str, *args: str, while_alive=None) -> dict:
    """Run ``script`` (a process that takes the lease of ``url``), call ``while_alive()`` while it
    holds it, SIGKILL it (no release, no renewal any more); the lease it left behind."""
    proc = subprocess.Popen([sys.executable, "-c", script, url, *args], stdout=subprocess.PIPE,
                            env=server.subprocess_env(), text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        if while_alive is not None:
            while_alive()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(_raw_get(_raw(server, url), ".run.lock"))


def _racers(server, url: str, n: int) -> tuple[list, list[BaseException]]:
    """``n`` jobs taking the lease at the same moment: the leases won, the errors of the rest."""
    stores = [_storage(server, url) for _ in range(n)]
    won, lost = [], []
    gate = threading.Barrier(n)

    def take(i: int) -> None:
        gate.wait()
        try:
            won.append(stores[i].lock({"host": f"racer-{i}", "pid": i}))
        except LockHeldError as exc:
            lost.append(exc)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_killed_holders_lease_expires_and_exactly_one_racer_takes_it(s3_server, tmp_path):
    url = s3_server.new_url()
    stale = _holder_killed(s3_server, url, _HOLD, "1.5")
    assert "released" not in stale
    if time.time() < stale["expires"] - 0.2:  # still live right after the kill
        with pytest.raises(LockHeldError, match="job id crashed"):
            _storage(s3_server, url).lock({"host": "too-early"})
    time.sleep(max(0.0, stale["expires"] - time.time()) + 0.05)
    won, lost = _racers(s3_server, url, 4)
    assert len(won) == 1 and len(lost) == 3
    winner = won[0].holder["host"]
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["holder"]["host"] == winner
    assert all(f"host {winner}" in str(e) for e in lost)
    won[0].release()


def test_racers_for_a_new_run_exactly_one_wins(s3_server):
    won, lost = _racers(s3_server, s3_server.new_url(), 4)
    assert len(won) == 1 and len(lost) == 3
    won[0].release()


def test_zarr_hierarchy_through_zarr_store_read_by_plain_zarr(s3_server):
    from zarr.storage import ObjectStore

    st = _storage(s3_server)
    st.create_hierarchy()
    st.check_hierarchy()
    g = zarr.open_group(st.zarr_store(), mode="a", zarr_format=3)
    data = np.arange(4000 * 3, dtype=np.float32).reshape(4000, 3)
    arr = g["ranks"].create_array("positions", shape=data.shape, chunks=(256, 3),
                                  shards=(1024, 3), dtype=data.dtype)
    arr[:] = data
    plain = zarr.open_group(ObjectStore(_raw(s3_server, st.root_url + "/data.zarr"),
                                        read_only=True), mode="r")
    assert list(plain.group_keys()) == ["ranks"]
    np.testing.assert_array_equal(plain["ranks/positions"][:], data)
    assert json.loads(_raw_get(_raw(s3_server, st.root_url), "data.zarr/ranks/zarr.json"))[
        "node_type"] == "group"
    st.replace("data.zarr/ranks/zarr.json", b"garbage")
    with pytest.raises(DamageError, match="not a Zarr v3 group node"):
        st.check_hierarchy()


def test_bad_credentials_fail_at_open_with_a_clear_error(s3_server):
    bad = dict(s3_server.storage_options, secret_access_key="not-the-secret")
    t = time.monotonic()
    with pytest.raises(RunError, match="access denied") as err:
        open_storage(s3_server.new_url(), bad)
    assert time.monotonic() - t < 10  # a guard against retrying for minutes, not a timing
    assert "not-the-secret" not in str(err.value) and s3_server.secret_key not in str(err.value)


def test_unreachable_endpoint_fails_at_open_within_seconds(s3_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    opts = dict(s3_server.storage_options, endpoint=f"http://127.0.0.1:{port}")
    t = time.monotonic()
    with pytest.raises(RunError, match=f"cannot reach the object store at http://127.0.0.1:{port}"):
        open_storage(s3_server.new_url(), opts)
    assert time.monotonic() - t < 10


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(RunError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/run", s3_server.storage_options)


def test_paths_leaving_the_prefix_are_refused(s3_server):
    parent = s3_server.new_url("parent")
    st = _storage(s3_server, parent + "/run")
    for call in (lambda: st.read("../x"), lambda: st.replace("../x", b"x"),
                 lambda: st.replace("a/../../x", b"x"), lambda: st.remove("../x"),
                 lambda: st.list(".."), lambda: st.path("/etc/passwd"),
                 lambda: st.zarr_store("../data.zarr"), lambda: st.lock(HOLDER, "../.run.lock")):
        with pytest.raises(DamageError, match="points outside the run directory"):
            call()
    assert [o["path"] for o in obstore.list(_raw(s3_server, parent)).collect()] == []
    st.replace("a/../b.json", b"inside")  # normalised, still inside
    assert st.list("") == ["b.json"]


def test_credentials_are_never_written_into_the_run(s3_server):
    st = _storage(s3_server)
    st.lock(HOLDER).release()
    st.commit_manifest(b"{}")
    st.create_hierarchy()
    raw = _raw(s3_server, st.root_url)
    keys = [o["path"] for o in obstore.list(raw).collect()]
    assert ".run.lock" in keys and "run.json" in keys
    for k in keys:
        assert s3_server.secret_key.encode() not in _raw_get(raw, k)
    assert s3_server.secret_key not in repr(st)


def test_open_storage_picks_the_backend(tmp_path, s3_server):
    assert isinstance(open_storage(tmp_path), LocalRunStorage)
    local = open_storage(f"file://{tmp_path}/run")
    assert isinstance(local, LocalRunStorage) and local.root == tmp_path / "run"
    assert local.url("run.json") == str(tmp_path / "run" / "run.json")
    assert isinstance(open_storage(s3_server.new_url(), s3_server.storage_options),
                      ObjectRunStorage)
    for bad in ("gs://bucket/run", "s3:///no-bucket", "file://otherhost/run"):
        with pytest.raises(RunError):
            open_storage(bad)
    with pytest.raises(RunError, match="s3:// runs only"):
        open_storage(tmp_path, {"region": "x"})


def test_without_obstore_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore -> ImportError
    with pytest.raises(MissingDependencyError, match=r"dist_hooks\[s3\]"):
        open_storage("s3://bucket/run")


def test_live_lease_is_renewed_past_its_length_and_an_abandoned_one_released(s3_server):
    import gc

    url = s3_server.new_url()
    st = _storage(s3_server, url, lease_s=1.0)
    lease = st.lock(HOLDER)
    first = json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["expires"]
    time.sleep(2.1)  # over twice the lease: only renewals keep it
    now = json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))
    assert now["expires"] > first and "released" not in now and lease.lost is None
    with pytest.raises(LockHeldError, match="job id job-17"):
        _storage(s3_server, url).lock({"host": "node-b"})
    st.commit_manifest(b"{}")  # renewed in time: commits
    del lease
    gc.collect()
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["released"]


_HOLD_HERE = """
import os, socket, sys, time
from dist_hooks.store.object_storage import ObjectRunStorage
st = ObjectRunStorage(sys.argv[1], {"lease_s": 600})
lease = st.lock({"host": socket.gethostname(), "pid": os.getpid(), "job_id": "crashed-here"})
print("held", flush=True)
time.sleep(600)
"""


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(s3_server):
    """A job killed on this node and relaunched here need not wait out a 600 s lease; the same
    lease held by a live process, or named by another host, is refused."""
    url = s3_server.new_url()

    def alive() -> None:
        with pytest.raises(LockHeldError, match="job id crashed-here"):  # alive: refused
            _storage(s3_server, url).lock({"host": "relaunch"})

    stale = _holder_killed(s3_server, url, _HOLD_HERE, while_alive=alive)
    assert stale["expires"] > time.time() + 500 and "released" not in stale
    lease = _storage(s3_server, url).lock({"host": socket.gethostname(), "pid": os.getpid()})
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["token"] == lease.token
    lease.release()
    other = dict(stale, holder={**stale["holder"], "host": "another-node"})
    obstore.put(_raw(s3_server, url), ".run.lock", json.dumps(other).encode())
    with pytest.raises(LockHeldError, match="another-node"):  # cannot tell: left to expire
        _storage(s3_server, url).lock({"host": "relaunch"})


def test_a_takeover_fences_run_json_against_a_frozen_holder(s3_server):
    """A holder frozen past its lease (its check passed, its PUT late) must not commit over the
    job that took the run over: the takeover rewrites run.json, so the late PUT's If-Match fails."""
    url = s3_server.new_url()
    old = _storage(s3_server, url, lease_s=0.9)
    lease = old.lock(HOLDER)
    old.commit_manifest(b'{"boundaries": 1}\n')
    lease._stop.set()  # frozen: it renews no more, and believes what it last saw
    time.sleep(1.0)
    new = _storage(s3_server, url)
    new.lock({"host": "node-b", "pid": 2}).release()
    fenced = _raw_get(_raw(s3_server, url), "run.json")
    assert fenced != b'{"boundaries": 1}\n' and json.loads(fenced) == {"boundaries": 1}
    with pytest.raises(Exception) as late:  # the frozen holder's commit, past its own check
        old.put_object("run.json", b'{"boundaries": 2}\n', put_mode(old._manifest_version))
    assert isinstance(late.value, precondition_failed())
    assert json.loads(_raw_get(_raw(s3_server, url), "run.json")) == {"boundaries": 1}


def test_a_restart_of_the_same_job_on_another_node_waits_for_the_lease(s3_server):
    """A lease of this job id from another node (a requeue, a torchrun restart) is waited out;
    another job's is refused at once."""
    url = s3_server.new_url()
    doc = {"holder": {"host": "node-dead", "pid": 7, "job_id": "slurm-42"}, "token": "t" * 32,
           "lease_s": 1.5, "renewed": time.time(), "expires": time.time() + 1.5}
    obstore.put(_raw(s3_server, url), ".run.lock", json.dumps(doc).encode())
    with pytest.raises(LockHeldError, match="slurm-42"):
        _storage(s3_server, url).lock({"host": "node-b", "pid": 1, "job_id": "slurm-43"})
    t0 = time.monotonic()
    lease = _storage(s3_server, url).lock({"host": "node-b", "pid": 1, "job_id": "slurm-42"})
    assert time.monotonic() - t0 >= 1.0
    assert json.loads(_raw_get(_raw(s3_server, url), ".run.lock"))["token"] == lease.token
    lease.release()


@pytest.mark.parametrize("mangled", ["s3:/bucket/run", "s3:bucket/run", "S3:/b", "file:/tmp/x"])
def test_a_mangled_url_is_refused_not_taken_for_a_local_directory(mangled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match="not a valid URL"):
        open_storage(mangled)
    from dist_hooks import Run

    with pytest.raises(RunError, match="not a valid URL"):
        Run(mangled, handle_signals=False)
    assert not any(tmp_path.iterdir())  # no directory "s3:" (or "file:") made

"""``dist-hooks`` and ``open_run`` on ``s3://`` runs, against a real S3 server (SeaweedFS).

A real demo run is recorded on local disk once, then put on the server as an object-store run
(tests/support/s3_runs.py: every file one object at its relative key, each CSV log as parts):
the local run is the independent reference. The commands run in subprocesses with the AWS
variables pointing at the server, as a user runs them; what they produce is compared byte for
byte with the same command on the local run.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mp.runner import REPO_ROOT, clean_env, run_command
from s3_runs import upload_run

from dist_hooks.cli import main
from dist_hooks.reader import open_run
from dist_hooks.store.log_parts import part_name
from dist_hooks.store.object_storage import ObjectRunStorage
from dist_hooks.tools.info import run_info
from dist_hooks.tools.mirror import INDEX_DIR, mirror_run

ENTRY = str(REPO_ROOT / "tests" / "mp" / "demo_entry.py")
DEMO = ["--steps", "30", "--relax-steps", "20", "--systems-per-rank", "4", "--min-atoms", "8",
        "--max-atoms", "16", "--fmax", "0.02", "--checkpoint-every", "10", "--snapshot-every",
        "5", "--timeout", "60", "--quiet"]
LOG = "logs/log/rank-00000.csv"
SHARD = "data.zarr/ranks/rank-00000/snapshots/positions/c.0.0"


@pytest.fixture(scope="module")
def local_run(request, tmp_path_factory) -> Path:
    """A finished 1-rank demo run on local disk (the S3 server starts while it records)."""
    out = tmp_path_factory.mktemp("s3tools") / "run"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_command, [sys.executable, ENTRY, "--out", str(out), *DEMO],
                          timeout=120, env=clean_env())
        request.getfixturevalue("s3_server")
        p = job.result()
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return out


@pytest.fixture
def s3_run(local_run, s3_server):
    """The local run put on the server at a fresh URL: ``(url, storage, part offsets)``."""
    url = s3_server.new_url("tools")
    storage = ObjectRunStorage(url, s3_server.storage_options)
    offsets = upload_run(local_run, storage, parts=3)
    assert len(offsets[LOG]) == 3
    return url, storage, offsets


def dh(env: dict, *args) -> subprocess.CompletedProcess:
    """``dist-hooks ARGS`` in a subprocess."""
    return run_command([sys.executable, "-m", "dist_hooks.cli", *map(str, args)], timeout=90,
                       env=env)


def in_parallel(*calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c[0], *c[1:]) for c in calls]]


def tree(path: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not any(s in p.relative_to(path).parts for s in skip)}


def objects(storage: ObjectRunStorage, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix`` (relative to it), leases left out."""
    return {k[len(prefix) + 1:] if prefix else k: storage.read(k)
            for k in sorted(storage.list_tree(prefix)) if not k.endswith(".lock")}


def without_relative(marker: bytes) -> dict:
    """A consolidated.json with ``source.relative`` (where the run was) left out."""
    doc = json.loads(marker)
    del doc["source"]["relative"]
    return doc


def local_cli(*args) -> int:
    return main([str(a) for a in args])


def test_commands_on_an_s3_run_match_the_local_run(local_run, s3_run, s3_server, tmp_path,
                                                   monkeypatch):
    url, storage, _ = s3_run
    env = s3_server.subprocess_env(clean_env())
    cache = tmp_path / "cache"
    ref = tmp_path / "ref"  # the local run's copy, consolidated and exported locally
    shutil.copytree(local_run, ref, ignore=shutil.ignore_patterns(".run.lock"))
    info, verify, xyz, png = in_parallel(
        (dh, env, "info", url, "--json", "--cache", cache),
        (dh, env, "verify", url, "--cache", cache),
        (dh, env, "export", url, "--what", "trajectory", "--format", "extxyz",
         "--out", tmp_path / "s3.xyz", "--cache", cache),
        (dh, env, "plot", url, "--out", tmp_path / "s3.png", "--cache", cache))
    for p in (info, verify, xyz, png):
        assert p.returncode == 0, (p.args, p.stdout[-2000:], p.stderr[-3000:])
    assert verify.stdout.splitlines()[-1].startswith(f"OK: {url}: 3 boundaries")
    got = json.loads(info.stdout)
    want = run_info(ref, disk=False)
    assert got["run"] == url
    for key in ("world_size", "boundaries", "ranks", "totals", "step_range", "converged_count"):
        assert got[key] == want[key], key
    on_store = objects(storage, "")
    assert got["disk_bytes"]["total"] == sum(len(v) for v in on_store.values())
    assert png.stdout.startswith(f"{tmp_path / 's3.png'}: energy, fmax, temperature")
    assert (tmp_path / "s3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert local_cli("export", ref, "--what", "trajectory", "--format", "extxyz",
                     "--out", tmp_path / "ref.xyz", "--progress", "never") == 0
    assert (tmp_path / "s3.xyz").read_bytes() == (tmp_path / "ref.xyz").read_bytes()

    # consolidate, default --out: RUN/consolidated in the store, the bytes of a local one
    p = dh(env, "consolidate", url, "--cache", cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"{url}/consolidated: consolidated snapshots: 24 records")
    assert local_cli("consolidate", ref, "--progress", "never") == 0
    want_tree = tree(ref / "consolidated")
    assert objects(storage, "consolidated") == want_tree
    # the mirror knows what was uploaded: a second look fetches nothing
    m = mirror_run(url, cache, s3_server.storage_options)
    assert (m.fetched, m.removed) == (0, 0)
    assert tree(m.path / "consolidated") == want_tree
    p = dh(env, "consolidate", url, "--cache", cache)
    assert p.returncode == 0 and "up to date" in p.stdout, p.stderr[-3000:]

    # --out a local directory, and --out another prefix of the store (one at a time: two
    # consolidates of one run exclude each other, as on disk)
    other = s3_server.new_url("out")
    for p in (dh(env, "consolidate", url, "--out", tmp_path / "s3-out", "--cache", cache),
              dh(env, "consolidate", url, "--out", other, "--cache", cache)):
        assert p.returncode == 0, (p.args, p.stderr[-3000:])
    marker = "consolidated.json"
    mine = tree(tmp_path / "s3-out")
    theirs = objects(ObjectRunStorage(other, s3_server.storage_options), "")
    for got_tree in (mine, theirs):
        assert set(got_tree) == set(want_tree)
        assert {k: v for k, v in got_tree.items() if k != marker} == \
            {k: v for k, v in want_tree.items() if k != marker}
        assert without_relative(got_tree[marker]) == without_relative(want_tree[marker])
    # the consolidated output on the store reads as the run's
    p = dh(env, "info", other, "--json", "--cache", cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["totals"] == want["totals"]
    # an upload under way (old marker deleted, files changing): the output reads as incomplete
    storage.remove("consolidated/consolidated.json")
    storage.replace("consolidated/logs/log.csv", b"step,rank\n")
    run = open_run(url, storage_options=s3_server.storage_options, cache=cache)
    assert run.consolidated is None and not (run.path / "consolidated/consolidated.json").exists()
    assert len(run.logs("log")["step"]) == want["totals"]["log"]["rows"]
    # a local run consolidated into the store (in-process: the AWS variables of this process)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    into = s3_server.new_url("from-local")
    assert local_cli("consolidate", ref, "--out", into, "--cache", cache) == 0
    theirs = objects(ObjectRunStorage(into, s3_server.storage_options), "")
    assert {k: v for k, v in theirs.items() if k != marker} == \
        {k: v for k, v in want_tree.items() if k != marker}


def test_damage_on_the_store_is_found(local_run, s3_server, tmp_path):
    env = s3_server.subprocess_env(clean_env({"XDG_CACHE_HOME": str(tmp_path)}))
    runs = {}
    for case in ("shard", "missing", "gap", "header"):
        url = s3_server.new_url(case)
        st = ObjectRunStorage(url, s3_server.storage_options)
        offsets = upload_run(local_run, st, parts=3)[LOG]
        if case == "shard":
            st.replace(SHARD, st.read(SHARD)[:-40])
        elif case == "missing":
            st.remove("boundaries/b-000001.json")
        elif case == "gap":
            st.remove(f"{LOG}/{part_name(offsets[1])}")
        else:
            second = f"{LOG}/{part_name(offsets[1])}"
            data = st.read(second)
            st.replace(second, b"x" + data)
        runs[case] = url
    res = in_parallel(*[(dh, env, "verify", url) for url in runs.values()],
                      (dh, env, "consolidate", runs["gap"]))
    for (case, url), p in zip(runs.items(), res):
        assert p.returncode == 1, (case, p.stdout, p.stderr[-3000:])
        assert p.stdout.splitlines()[-1].startswith(f"DAMAGED: {url}:"), (case, p.stdout)
    shard, missing, gap, header = (p.stdout for p in res[:4])
    assert f"{SHARD}: shard index checksum mismatch" in shard, shard
    assert "boundaries/b-000001.json: file missing" in missing, missing
    assert f"{LOG}: file is" in gap and f"{runs['gap']}/{LOG}: its parts end at a gap" in gap, gap
    assert "header line differs" in header and part_name(0) not in header, header
    refused = res[4]
    assert refused.returncode == 1 and "refusing to consolidate" in refused.stderr
    assert "Traceback" not in refused.stderr
    st = ObjectRunStorage(runs["gap"], s3_server.storage_options)
    assert objects(st, "consolidated") == {}  # nothing written (but its released lease)
    assert len(list((tmp_path / "dist_hooks").glob("*-*"))) == 4  # the default cache: XDG's

def test_mirror_fetches_only_what_changed(local_run, s3_run, s3_server, tmp_path):
    url, storage, offsets = s3_run
    opts, cache = s3_server.storage_options, tmp_path / "cache"
    first = mirror_run(url, cache, opts)
    want = tree(local_run, skip=(".run.lock",))
    assert tree(first.path, skip=(INDEX_DIR,)) == want
    assert first.fetched == len(objects(storage, "")) and first.notes == {}
    again = mirror_run(url, cache, opts)
    assert (again.fetched, again.fetched_bytes, again.removed) == (0, 0, 0)
    assert tree(again.path, skip=(INDEX_DIR,)) == want
    # one object replaced, one part gone, a stray file in the mirror: exactly those change
    boundary = "boundaries/b-000001.json"
    storage.replace(boundary, b"{}")
    storage.remove(f"{LOG}/{part_name(offsets[LOG][2])}")
    (first.path / "data.zarr" / "stray").write_bytes(b"left by a killed tool")
    third = mirror_run(url, cache, opts)
    assert (third.fetched, third.removed) == (1, 1)
    assert (third.path / boundary).read_bytes() == b"{}"
    assert (third.path / LOG).read_bytes() == (local_run / LOG).read_bytes()[:offsets[LOG][2]]
    assert not (third.path / "data.zarr" / "stray").exists()
    # open_run reads it the same, naming the URL
    run = open_run(url, storage_options=opts, cache=cache)
    assert run.url == url and run.path == third.path and url in repr(run)
    ref = open_run(local_run)
    assert len(run.group(0, "snapshots")) == len(ref.group(0, "snapshots"))


def test_bad_credentials_and_dead_endpoint_are_one_clear_line(s3_server, tmp_path):
    url = s3_server.new_url("creds")
    bad = s3_server.subprocess_env(clean_env())
    bad["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-0123456789"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = {**s3_server.subprocess_env(clean_env()), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    denied, unreachable = in_parallel((dh, bad, "info", url, "--cache", tmp_path),
                                      (dh, dead, "verify", url, "--cache", tmp_path))
    for p, words in ((denied, "access denied"), (unreachable, "cannot reach the object store")):
        assert p.returncode == 2, (p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and url in lines[0], p.stderr
        assert "Traceback" not in p.stderr
        for secret in ("wrong-secret-0123456789", s3_server.secret_key):
            assert secret not in p.stderr + p.stdout
    assert not any(tmp_path.iterdir())  # nothing mirrored, nothing written


def test_consolidate_refuses_an_out_that_would_replace_the_run_or_other_objects(local_run,
                                                                                s3_server,
                                                                                tmp_path):
    """On the store as on disk: --out may not be the run or a prefix holding it, nor a prefix
    holding objects that are no consolidated output; each is refused before anything is written."""
    env = s3_server.subprocess_env(clean_env())
    proj = s3_server.new_url("proj")
    run_url = f"{proj}/run1"
    upload_run(local_run, ObjectRunStorage(run_url, s3_server.storage_options), parts=2)
    parent = ObjectRunStorage(proj, s3_server.storage_options)
    parent.replace("notes.txt", b"keep me")
    other = ObjectRunStorage(f"{proj}/other", s3_server.storage_options)
    other.replace("data.bin", b"not an output")
    before = objects(parent, "")
    for out, words in ((proj, "would replace the run"), (run_url, "would replace the run"),
                       (f"{run_url}/data.zarr/x", "inside the run's own data.zarr"),
                       (f"{proj}/other", "no consolidated output")):
        p = dh(env, "consolidate", run_url, "--out", out, "--cache", tmp_path / "cache")
        assert p.returncode == 2 and words in p.stderr, (out, p.stdout, p.stderr)
    assert objects(parent, "") == before  # nothing deleted, nothing added

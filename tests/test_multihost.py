"""Two "hosts" on one machine: network namespaces joined by a veth pair, torchrun across them.

Each namespace acts as a node with its own network address and its own node-local data directory.
``launch/torchrun.sh`` runs on both with ``NNODES=2`` and a c10d rendezvous hosted by the first
(``--rdzv-endpoint=<node A's address>:port``); the demo writes with ``--storage local`` (each rank's
CSV, shards and state on its node's directory) and ``--out`` a shared run directory where only
the coordinator (global rank 0) writes: the manifest and the converged records of both ranks,
which reach it over the communicator (the c10d store and gloo, across the veth link).

Checked: ``run.json`` committed with world size 2; each node directory holds exactly its own
rank's data; the merged converged group equals the union of the two ranks' converged records, read
with plain zarr from the node directories; every rank's CSV is complete.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip``. Where either is missing the
test is skipped with the reason, after actually trying ``ip netns add``. The addresses
(10.213.7.1 and .2) exist only inside the two namespaces this test creates, and the namespaces
(with the veth pair and every process left in them) are removed in a ``finally``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from mp.runner import REPO_ROOT, clean_env
from test_launch_scripts import DEMO, STEPS, assert_complete_logs, assert_merged_is_union, manifest

ADDR = ("10.213.7.1", "10.213.7.2")
PORT = 29400
TIMEOUT = 150  # seconds for the whole two-node job


def _ip() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip")
                                       if os.access(p, os.X_OK)), None)


def _sh(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _skip(reason: str) -> None:
    print(f"test_multihost skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _remove_namespace(ip: str, ns: str) -> None:
    """Kill what this test left running inside ``ns`` (only our torchrun jobs live there), then
    delete it; the veth end inside goes with it."""
    pids = _sh([ip, "netns", "pids", ns]).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    for _ in range(50):
        if _sh([ip, "netns", "del", ns]).returncode == 0:
            return
        time.sleep(0.1)


def test_two_nodes_in_network_namespaces(tmp_path):
    ip = _ip()
    if ip is None:
        _skip("iproute2's `ip` is not installed: cannot create network namespaces for two nodes")
    tag = secrets.token_hex(3)  # fresh names: never an existing namespace or interface
    ns = [f"dh{tag}a", f"dh{tag}b"]
    veth = [f"dhv{tag}a", f"dhv{tag}b"]  # interface names: at most 15 characters
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    try:
        res = _sh([ip, "netns", "add", ns[0]])
        if res.returncode != 0:
            _skip(f"cannot create a network namespace (`ip netns add` failed: {res.stderr.strip()}); "
                  "this test needs root or CAP_SYS_ADMIN and CAP_NET_ADMIN")
        created.append(ns[0])
        res = _sh([ip, "netns", "add", ns[1]])
        assert res.returncode == 0, res.stderr
        created.append(ns[1])
        res = _sh([ip, "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]])
        if res.returncode != 0:
            _skip(f"cannot create a veth pair (`ip link add ... type veth` failed: {res.stderr.strip()})")
        for n, v, a in zip(ns, veth, ADDR):
            for cmd in (["link", "set", v, "netns", n], ["-n", n, "addr", "add", f"{a}/24", "dev", v],
                        ["-n", n, "link", "set", v, "up"], ["-n", n, "link", "set", "lo", "up"]):
                res = _sh([ip, *cmd])
                assert res.returncode == 0, (cmd, res.stderr)
        res = _sh([ip, "netns", "exec", ns[0], "true"])
        if res.returncode != 0:
            _skip(f"`ip netns exec` does not work here: {res.stderr.strip()}")

        run = tmp_path / "run"  # shared by both "nodes" (one filesystem, as a parallel FS would be)
        node_dirs = [tmp_path / "node-a-local", tmp_path / "node-b-local"]
        logs = [tmp_path / "node-a.log", tmp_path / "node-b.log"]
        for n, v, a, d, log in zip(ns, veth, ADDR, node_dirs, logs):
            env = clean_env({
                "PYTHON": sys.executable, "NPROC": "1", "NNODES": "2",
                "RDZV_ENDPOINT": f"{ADDR[0]}:{PORT}", "RDZV_ID": f"multihost-{tag}",
                "LOCAL_ADDR": a,            # the address the other node reaches this one at
                "GLOO_SOCKET_IFNAME": v,    # gloo's own connections over the veth link too
            })
            cmd = [ip, "netns", "exec", n, "timeout", "-k", "5", str(TIMEOUT),
                   "bash", str(REPO_ROOT / "launch" / "torchrun.sh"), str(run), *DEMO,
                   "--storage", "local", "--local-dir", str(d)]
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                              cwd=str(REPO_ROOT), start_new_session=True))
        deadline = time.monotonic() + TIMEOUT + 20
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                codes.append(124)
        text = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
        assert codes == [0, 0], text

        m = manifest(run)
        assert (m["world_size"], m["launcher"], m["storage"]) == (2, "torchrun", "local"), text
        assert m["last"]["all_final"] and m["last"]["steps"] == [STEPS, STEPS]
        # each node's directory holds exactly one rank's data; the run directory none
        owner = {}
        for d in node_dirs:
            ranks = sorted(p.name for p in (d / "data.zarr" / "ranks").iterdir() if p.is_dir())
            assert len(ranks) == 1, (d, ranks)
            owner[int(ranks[0].split("-")[1])] = d
        assert sorted(owner) == [0, 1]
        assert not (run / "data.zarr" / "ranks").exists() and not (run / "logs").exists()
        merged = assert_merged_is_union(run, owner)
        assert merged > 0, "nothing converged: the union check would be empty"
        for rank, d in owner.items():
            assert_complete_logs(d, 1, rank_offset=rank)
        out = "".join(log.read_text() for log in logs)
        assert f"Run output: {run.resolve()}" in out
        print(f"two-node job: {merged} converged records merged, "
              f"{json.dumps([b['converged_count'] for b in m['boundaries']])} per boundary")
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait()
        for n in created:
            _remove_namespace(ip, n)
        for v in veth:  # only left in this namespace when moving it failed
            if ip is not None and _sh([ip, "link", "show", v]).returncode == 0:
                _sh([ip, "link", "del", v])

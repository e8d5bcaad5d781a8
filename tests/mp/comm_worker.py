"""One rank of a communicator test job (run by tests/comm/test_comm.py under torchrun / mpiexec).

Usage: comm_worker.py OUT_DIR MODE [--kind auto] [--timeout S] [--early-rank R] [--op OP]

MODE ``ok``: run barrier / gather / broadcast (and ``allgather``, built here from gather and
broadcast) with non-trivial objects and write what this rank received to OUT_DIR/rank-<r>.json.

MODE ``early``: after a first barrier, rank R leaves without calling OP (``--early-style``:
``exit`` = ``os._exit(0)``, a clean status so the launcher does not tear the job down, and no
clean-up, as if it vanished; ``finalize`` = normal exit, finalising MPI; ``sleep`` = never
arrives); the others call OP and record the CommTimeoutError they get (message, missing ranks,
elapsed time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dist_hooks.comm import CommTimeoutError, get_communicator


def payload(rank: int) -> dict:
    """The object rank ``rank`` contributes (the test recomputes it independently)."""
    return {"rank": rank, "name": f"rank-{rank}", "values": [rank * i for i in range(5)],
            "nested": {"even": rank % 2 == 0, "tags": ["a"] * (rank + 1)}, "none": None}


def allgather(comm, obj, timeout: float | None = None) -> list:
    """Every rank gets the list of all ranks' objects, indexed by rank: a gather to rank 0, then
    its broadcast.  Only tests need it (the package gathers to the coordinator and broadcasts its
    decision), so it lives here, on top of the two collectives under test."""
    return comm.broadcast(comm.gather(obj, root=0, timeout=timeout), root=0, timeout=timeout)


def store_key_count(comm) -> int | None:
    store = getattr(comm, "_store", None)
    return store.num_keys() if store is not None else None


def run_ok(comm, out: Path) -> None:
    rank, world = comm.rank, comm.world_size
    last = world - 1
    record: dict = {"rank": rank, "world_size": world, "name": comm.name}
    comm.barrier()
    record["gather0"] = comm.gather(payload(rank), root=0)
    record["gather_last"] = comm.gather(payload(rank), root=last)
    record["allgather"] = allgather(comm, payload(rank))
    record["bcast0"] = comm.broadcast(payload(rank) if rank == 0 else None, root=0)
    record["bcast_last"] = comm.broadcast(payload(rank) if rank == last else "ignored", root=last)
    # A few MB through the communicator: rank 1 broadcasts 3 MB, everyone allgathers 256 kB.
    blob = comm.broadcast(os.urandom(3 << 20).hex()[: 3 << 20] if rank == 1 else None, root=1)
    record["blob_len"] = len(blob)
    record["blob_sha"] = hashlib.sha256(blob.encode()).hexdigest()
    shas = allgather(comm, hashlib.sha256(("x" * (256 << 10) + str(rank)).encode()).hexdigest())
    big = allgather(comm, "x" * (256 << 10) + str(rank))
    record["big_ok"] = [hashlib.sha256(b.encode()).hexdigest() for b in big] == shas
    # Many rounds must not grow the store (torch): count keys after a quiet barrier.
    counts = []
    for rounds in (3, 30):
        for i in range(rounds):
            allgather(comm, {"i": i, "r": rank})
            comm.gather(i, root=i % world)
            comm.broadcast(i, root=i % world)
            comm.barrier()
        comm.barrier()
        time.sleep(0.3)
        counts.append(store_key_count(comm))
        comm.barrier()
    record["key_counts"] = counts
    comm.close()
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def run_early(comm, out: Path, early_rank: int, op: str, timeout: float, style: str) -> None:
    rank, world = comm.rank, comm.world_size
    # Everyone finishes initialising first (a store host that vanished during a peer's
    # init_process_group would fail that peer outside our code): survivors pass a barrier and drop
    # a file; the early rank leaves only once it has seen them all.
    comm.barrier()
    if rank != early_rank:
        (out / f"ready-{rank}").touch()
    else:
        deadline = time.monotonic() + 60.0
        while not all((out / f"ready-{r}").exists() for r in range(world) if r != rank):
            if time.monotonic() > deadline:
                raise SystemExit("survivors never got ready")
            time.sleep(0.02)
        if style == "exit":
            os._exit(0)
        if style == "sleep":
            time.sleep(timeout * 3 + 5)
            os._exit(0)
        sys.exit(0)  # "finalize": normal interpreter exit (mpi4py finalizes MPI at exit)
    record: dict = {"rank": rank, "op": op}
    start = time.monotonic()
    try:
        if op == "gather":
            result = comm.gather(payload(rank), root=0, timeout=timeout)
        elif op == "barrier":
            result = comm.barrier(timeout=timeout)
        elif op == "broadcast":
            result = comm.broadcast(payload(rank), root=early_rank, timeout=timeout)
        else:
            raise SystemExit(f"unknown op {op}")
        record["result"] = result
    except CommTimeoutError as exc:
        record.update(error=str(exc), type=type(exc).__name__, missing=exc.missing_ranks)
    record["elapsed"] = time.monotonic() - start
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    # Leave only when every survivor has recorded its outcome: MPICH's launcher tears the whole job
    # down as soon as one process exits without finalising, which could kill a survivor still
    # waiting for rank 0's relayed error (seen on a loaded machine).
    deadline = time.monotonic() + 60.0
    while not all((out / f"rank-{r}.json").exists() for r in range(world) if r != early_rank):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    os._exit(0)  # the communicator's peers are gone; skip close() and interpreter clean-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=["ok", "early"])
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--early-rank", type=int, default=1)
    parser.add_argument("--op", default="gather")
    parser.add_argument("--early-style", choices=["exit", "finalize", "sleep"], default="exit")
    ns = parser.parse_args()
    comm = get_communicator(ns.kind, timeout=30.0)
    if ns.mode == "ok":
        run_ok(comm, ns.out)
    else:
        run_early(comm, ns.out, ns.early_rank, ns.op, ns.timeout, ns.early_style)


if __name__ == "__main__":
    main()

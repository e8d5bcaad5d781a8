"""LoggingHook's CSV written straight to a real S3 server (SeaweedFS, the ``s3_server``
fixture) as immutable parts: the logical log equals the local CSV of the same firings byte for
byte, every part is a CSV pandas reads alone, the header is there at the first firing, a resume
equals an uninterrupted run, and ``check_committed`` refuses a damaged or missing part.

References are independent of the code under test: the local CSV (the local path, unchanged)
and the parts read back with a plain obstore client.
"""
from __future__ import annotations

import io
import re
import zlib

import obstore
import pandas as pd
import pytest
from obstore.store import S3Store

from dist_hooks.errors import DamageError, RunError
from dist_hooks.hooks import LoggingHook
from dist_hooks.stages import Stage
from dist_hooks.store.log_parts import LogParts, part_name
from dist_hooks.store.manifest import CsvCommit
from dist_hooks.store.object_storage import ObjectRunStorage

from batches import Ctx, make_batch

COLUMNS = ["step", "rank", "sample_id", "graph_idx", "status", "energy", "fmax", "temperature"]
REL = "logs/log/rank-00000.csv"
N = 14  # firings; ring_size 4: blocks at 4, 8 and the batch-size change at 10, then 14


def batch(step: int):
    """The same batch for a step whoever asks (a resumed run repeats no state)."""
    counts = [3, 5, 2, 7] if step < 10 else [4, 1, 6]
    return make_batch(counts, seed=step, first_id=100 * (step >= 10))


def hook_at(where, **kw) -> LoggingHook:
    kw.setdefault("ring_size", 4)
    kw.setdefault("flush_interval", None)
    return LoggingHook(log_path=where, rank=0, reductions="eager", **kw)


def drive(hook: LoggingHook, steps) -> None:
    for step in steps:
        hook(Ctx(batch(step), step_count=step), Stage.AFTER_STEP)


def raw_parts(server, url: str, rel: str = REL) -> dict[int, bytes]:
    """Every part of the log, read with a plain obstore client: offset -> bytes."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    store = S3Store(bucket, prefix=f"{prefix}/{rel}",
                    config={k: v for k, v in server.storage_options.items() if k != "allow_http"},
                    client_options={"allow_http": True})
    out = {}
    for o in obstore.list(store).collect():
        name = o["path"].rsplit("/", 1)[-1]
        assert name.startswith("part-") and name.endswith(".csv"), name
        out[int(name[5:-4])] = bytes(obstore.get(store, o["path"]).bytes())
    return dict(sorted(out.items()))


def logical(parts: dict[int, bytes]) -> bytes:
    """The log the parts make: the first whole, each later one without its header line."""
    first = parts[0]
    header = first[: first.index(b"\n") + 1]
    out = bytearray(first)
    for off, data in parts.items():
        if off:
            assert off == len(out) and data.startswith(header)
            out += data[len(header):]
    return bytes(out)


@pytest.fixture
def url(s3_server) -> str:
    return s3_server.new_url("csvlog")


def local_log(tmp_path, steps=range(N)) -> bytes:
    hook = hook_at(tmp_path / "logs" / "log")
    drive(hook, steps)
    hook.close()
    return (tmp_path / "logs" / "log" / "rank-00000.csv").read_bytes()


def test_object_log_equals_the_local_csv_and_every_part_is_a_csv(s3_server, url, tmp_path):
    want = local_log(tmp_path)
    hook = hook_at(f"{url}/logs/log", storage_options=s3_server.storage_options)
    assert hook.committed_path(0) == hook.rank_path(0) == f"{url}/{REL}"
    drive(hook, range(N))
    final = hook.sync()
    hook.close()
    parts = raw_parts(s3_server, url)
    header = want[: want.index(b"\n") + 1]
    assert parts[0] == header  # written alone at the first firing
    assert len(parts) == 1 + 4  # one PUT per block: rings at 4 and 8, the resize at 10, 14
    assert logical(parts) == want
    storage = ObjectRunStorage(url, s3_server.storage_options)
    assert LogParts(storage, REL).read() == want
    assert final == {"path": f"{url}/{REL}", "bytes": len(want), "rows": want.count(b"\n") - 1,
                     "crc32": zlib.crc32(want)}
    frames = [pd.read_csv(io.BytesIO(data)) for data in parts.values()]
    assert all(list(f.columns) == COLUMNS for f in frames) and len(frames[0]) == 0
    assert pd.concat(frames[1:], ignore_index=True).equals(pd.read_csv(io.BytesIO(want)))
    storage.check_committed(CsvCommit(REL, final["bytes"], final["rows"], final["crc32"]), "log")


def test_header_is_there_after_the_first_firing(s3_server, url):
    hook = hook_at(f"{url}/logs/log", storage_options=s3_server.storage_options, frequency=10)
    drive(hook, range(5))  # fires at step 0 only; its rows stay in the ring
    parts = raw_parts(s3_server, url)
    assert list(parts) == [0]
    df = pd.read_csv(io.BytesIO(parts[0]))
    assert list(df.columns) == COLUMNS and len(df) == 0
    hook.flush()
    df = pd.read_csv(io.BytesIO(logical(raw_parts(s3_server, url))))
    assert df["step"].tolist() == [0] * 4
    hook.close()


def test_resume_from_a_boundary_equals_an_uninterrupted_run(s3_server, url, tmp_path):
    want = local_log(tmp_path)
    opts = s3_server.storage_options
    first = hook_at(f"{url}/logs/log", storage_options=opts)
    drive(first, range(6))
    point = first.sync()  # the boundary before step 6
    drive(first, range(6, 11))  # written after it: never committed
    first.close()
    assert len(logical(raw_parts(s3_server, url))) > point["bytes"]
    again = hook_at(f"{url}/logs/log", storage_options=opts)
    again.bind(rank=0, resume_point=point)
    drive(again, range(6, N))
    final = again.sync()
    again.close()
    assert logical(raw_parts(s3_server, url)) == want
    assert (final["bytes"], final["crc32"]) == (len(want), zlib.crc32(want))


def test_resume_from_nothing_committed_and_a_restart_that_continues(s3_server, url, tmp_path):
    opts = s3_server.storage_options
    lost = hook_at(f"{url}/logs/log", storage_options=opts)
    drive(lost, range(3))
    lost.close()
    fresh = hook_at(f"{url}/logs/log", storage_options=opts)
    fresh.bind(rank=0, resume_point={})  # the run never reached a boundary: cut to nothing
    drive(fresh, range(4))
    fresh.close()
    later = hook_at(f"{url}/logs/log", storage_options=opts)  # no resume point: continue
    drive(later, range(4, N))
    later.close()
    assert logical(raw_parts(s3_server, url)) == local_log(tmp_path)


def test_check_committed_refuses_a_damaged_or_missing_part(s3_server, url):
    hook = hook_at(f"{url}/logs/log", storage_options=s3_server.storage_options)
    drive(hook, range(N))
    c = hook.sync()
    hook.close()
    storage = ObjectRunStorage(url, s3_server.storage_options)
    commit = CsvCommit(REL, c["bytes"], c["rows"], c["crc32"])
    storage.check_committed(commit, "log")
    offsets = list(raw_parts(s3_server, url))
    key = f"{REL}/{part_name(offsets[2])}"
    good = storage.read(key)
    i = len(good) - 3  # a digit of the last row's temperature, the header kept
    storage.replace(key, good[:i] + (b"1" if good[i:i + 1] != b"1" else b"2") + good[i + 1:])
    where = re.escape(f"{url}/{REL}")
    with pytest.raises(DamageError, match=f"{where}: the committed first .* crc32"):
        storage.check_committed(commit, "log")
    storage.replace(key, good)
    storage.check_committed(commit, "log")
    storage.remove(key)
    with pytest.raises(DamageError, match=f"{where}: {offsets[2]} bytes, .* commits {c['bytes']}"):
        storage.check_committed(commit, "log")
    for off in offsets:
        storage.remove(f"{REL}/{part_name(off)}")
    with pytest.raises(DamageError, match=f"{where}: missing"):
        storage.check_committed(commit, "log")
    storage.check_committed(CsvCommit(REL, 0, 0, 0), "log")  # nothing committed: nothing to find


def test_credentials_from_the_environment_are_written_nowhere(s3_server, url, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    hook = hook_at(f"{url}/logs/log")
    drive(hook, range(5))
    info = hook.sync()
    hook.close()
    parts = raw_parts(s3_server, url)
    assert logical(parts).count(b"\n") == 1 + 5 * 4
    secret = s3_server.secret_key
    assert not [o for o, d in parts.items() if secret.encode() in d] and secret not in repr(info)


def test_object_store_refusals(s3_server, url, tmp_path):
    with pytest.raises(ValueError, match="tensorboard.*local directory"):
        LoggingHook(backend="tensorboard", log_path=f"{url}/tb")
    with pytest.raises(ValueError, match="storage_options are for backend='csv'"):
        LoggingHook(backend="tensorboard", log_path=tmp_path, storage_options={"region": "x"})
    with pytest.raises(RunError, match="storage_options apply to s3"):
        LoggingHook(log_path=tmp_path / "log", storage_options={"region": "x"})
    bad = dict(s3_server.storage_options, secret_access_key="wrong")
    with pytest.raises(RunError, match="access denied"):
        LoggingHook(log_path=f"{url}/logs/log", storage_options=bad)  # at construction

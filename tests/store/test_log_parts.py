"""The CSV log kept as immutable parts (store/log_parts.py), on a directory and on a real S3
server: the logical log equals the blocks written, each part is a CSV pandas reads alone, and a
cut back to a committed length keeps exactly that prefix."""
from __future__ import annotations

import io
import zlib

import pandas as pd
import pytest

from dist_hooks.errors import DamageError
from dist_hooks.store.log_parts import LogParts, part_name
from dist_hooks.store.storage import LocalRunStorage

HEADER = b'"step","energy"\n'
BLOCKS = [b"0,1.5\n1,2.5\n", b"2,3.5\n", b"3,4.5\n4,5.5\n5,6.5\n"]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalRunStorage(tmp_path)
    from dist_hooks.store.object_storage import ObjectRunStorage

    server = request.getfixturevalue("s3_server")
    return ObjectRunStorage(server.new_url("parts"), server.storage_options)


def written(storage, rel="logs/log/rank-00000.csv") -> LogParts:
    log = LogParts(storage, rel)
    log.truncate(0)
    for b in [HEADER, *BLOCKS]:
        log.append(b)
    return log


def test_logical_log_is_the_blocks_and_every_part_is_a_csv(storage):
    log = written(storage)
    whole = HEADER + b"".join(BLOCKS)
    assert log.read() == whole and log.size == len(whole) and log.crc32 == zlib.crc32(whole)
    assert LogParts(storage, log.rel).read() == whole  # a second reader, from the objects only
    offsets = log.offsets()
    assert offsets[0] == 0 and len(offsets) == 4
    frames = [pd.read_csv(io.BytesIO(storage.read(f"{log.rel}/{part_name(o)}"))) for o in offsets]
    assert list(pd.concat(frames)["step"]) == [0, 1, 2, 3, 4, 5]
    assert log.read(len(HEADER) + 5) == whole[: len(HEADER) + 5]  # a committed prefix


@pytest.mark.parametrize("cut", [0, len(HEADER), len(HEADER) + 6, len(HEADER) + 12 + 6 + 6])
def test_truncate_keeps_the_committed_prefix_and_continues(storage, cut):
    whole = HEADER + b"".join(BLOCKS)
    written(storage)
    again = LogParts(storage, "logs/log/rank-00000.csv")
    again.truncate(cut)
    assert again.read() == whole[:cut] and again.size == cut and again.crc32 == zlib.crc32(whole[:cut])
    if cut == 0:
        again.append(HEADER)
    again.append(b"9,9.5\n")
    want = (whole[:cut] if cut else HEADER) + b"9,9.5\n"
    assert LogParts(storage, again.rel).read() == want
    df = pd.read_csv(io.BytesIO(LogParts(storage, again.rel).read()))
    assert list(df["step"])[-1] == 9


def test_a_gap_ends_the_log_and_missing_committed_bytes_are_damage(storage):
    log = written(storage)
    offsets = log.offsets()
    storage.remove(f"{log.rel}/{part_name(offsets[2])}")
    assert LogParts(storage, log.rel).read() == HEADER + BLOCKS[0]  # nothing after the gap
    with pytest.raises(DamageError, match="manifest commits"):
        LogParts(storage, log.rel).truncate(log.size)


def test_a_part_with_another_header_is_damage(storage):
    log = written(storage)
    storage.replace(f"{log.rel}/{part_name(log.offsets()[1])}", b'"other"\n0,1\n')
    with pytest.raises(DamageError, match="header line differs"):
        LogParts(storage, log.rel).read()

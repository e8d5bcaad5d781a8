"""An object-store run downloaded into a directory by plain obstore, independently of the package:
every object at its key, each CSV log's parts (``X.csv/part-<offset>.csv``) joined back into
``X.csv`` (the first part whole, later ones without their header line, in offset order, checked
to follow each other). Tests then compare the directory with a run recorded on local disk."""
from __future__ import annotations

import re
from pathlib import Path

import obstore
from obstore.store import S3Store

_PART = re.compile(r"^(?P<log>.+\.csv)/part-(?P<off>\d{16})\.csv$")


def raw_store(server, url: str) -> S3Store:
    """A client on ``url``'s prefix, made from the server's credentials only."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    config = {k: v for k, v in server.storage_options.items() if k != "allow_http"}
    return S3Store(bucket, prefix=prefix or None, config=config, client_options={"allow_http": True})


def object_keys(server, url: str) -> list[str]:
    store = raw_store(server, url)
    return sorted(o["path"] for batch in obstore.list(store) for o in batch)


def download_run(server, url: str, dest: Path) -> Path:
    store = raw_store(server, url)
    parts: dict[str, list[tuple[int, bytes]]] = {}
    for key in object_keys(server, url):
        data = bytes(obstore.get(store, key).bytes())
        m = _PART.match(key)
        if m:
            parts.setdefault(m["log"], []).append((int(m["off"]), data))
            continue
        out = dest / key
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    for log, pieces in parts.items():
        pieces.sort()
        first = pieces[0][1]
        header = first[: first.index(b"\n") + 1]
        text = bytearray()
        for off, data in pieces:
            assert off == len(text), (log, off, len(text))
            assert data.startswith(header), (log, off)
            text += data if off == 0 else data[len(header):]
        out = dest / log
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bytes(text))
    return dest

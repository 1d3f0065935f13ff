"""Issue 16, item 1: a pulled layer is unpacked while its blob downloads, published only once
blob digest and DiffID check out, and a download that starts over, fails or lies leaves
nothing of the layer behind.  The registry is a local FakeServer that serves one image and can
hold the layer's second half back, drop the connection, ignore Range or corrupt bytes."""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from imagestore import pull as pull_mod
from imagestore.digest import Digest
from imagestore.errors import DigestMismatch, ImageNotFound, RegistryError
from imagestore.follow import FollowBroken, Follower
from imagestore.media import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from imagestore.registry import RegistryClient
from imagestore.registry_source import RegistrySource
from imagestore.store import Store
from tests.registry_util import FakeServer, Handler

pytestmark = pytest.mark.unit

FILES = {f"d{i % 7}/f{i}": os.urandom(1500) + bytes([i % 256]) * 500 for i in range(300)}
WAIT = 20.0  # seconds a test waits for something that should take milliseconds


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Image:
    def __init__(
        self, files: dict[str, bytes], diff_id: Digest | None = None, times: int = 1
    ) -> None:
        self.tar = layer_tar(files)
        self.blob = gzip.compress(self.tar, mtime=0)
        self.diff_id = diff_id or Digest.of(self.tar)
        self.config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [str(self.diff_id)] * times},
            }
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, self.config),
                "layers": [desc(OCI_LAYER_GZIP, self.blob)] * times,
            }
        ).encode()

    @property
    def blob_path(self) -> str:
        return f"/v2/r/blobs/{Digest.of(self.blob)}"


def desc(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


def registry(image: Image, blob_reply) -> FakeServer:
    """Serves `image` as r:t; the layer blob through `blob_reply(handler, count)`."""
    count = {"blob": 0}

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        if h.path == "/v2/r/manifests/t":
            return h.reply(200, image.manifest, {"Content-Type": OCI_MANIFEST})
        if h.path == f"/v2/r/blobs/{Digest.of(image.config)}":
            return h.reply(200, image.config)
        if h.path == image.blob_path:
            count["blob"] += 1
            return blob_reply(h, count["blob"])
        h.reply(404)

    return FakeServer(respond)


def send_half(h: Handler, blob: bytes) -> None:
    """Announce the whole blob, send its first half (the caller decides about the rest)."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(blob)))
    h.end_headers()
    h.wfile.write(blob[: len(blob) // 2])
    h.wfile.flush()


def run_pull(store: Store, server: FakeServer) -> pull_mod.PullResult:
    source = RegistrySource(f"{server.host}/r:t", tls_verify=False)
    source.client.close()
    source.client = RegistryClient(server.host, tls_verify=False, backoff=0.01, retries=1)
    try:
        with store.in_use():
            return pull_mod._pull(store, source, "img", None, None, 4)  # noqa: SLF001
    finally:
        source.close()


def layer_files(store: Store, diff_id: Digest) -> dict[str, bytes]:
    root = store.layer_dir(diff_id)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.layers.iterdir() if p.name.startswith(".tmp"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def test_layer_is_unpacked_while_it_downloads(store):
    """The server holds the blob's second half back until files of the first half are on
    disk in the layer's temp dir: without unpacking while downloading that never happens."""
    image = Image(FILES)
    seen_early: list[str] = []

    def reply(h: Handler, _count: int) -> None:
        send_half(h, image.blob)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not seen_early:
            seen_early.extend(str(p) for p in store.layers.glob(".tmp-*/diff/*/*") if p.is_file())
            time.sleep(0.01)
        h.wfile.write(image.blob[len(image.blob) // 2 :])

    with registry(image, reply) as server:
        result = run_pull(store, server)
    assert seen_early, "nothing was unpacked before the download ended"
    assert result.diff_ids == [image.diff_id]
    assert layer_files(store, image.diff_id) == FILES
    assert store.verified_diff_id(Digest.of(image.blob)) == image.diff_id
    assert leftovers(store) == []


def test_download_that_starts_over_falls_back_to_the_stored_blob(store):
    """The first answer hangs up half way, the retry's Range is ignored (200 from byte 0):
    the Ingest starts over, following breaks, and the committed blob is unpacked instead."""
    image = Image(FILES)

    def reply(h: Handler, count: int) -> None:
        if count == 1:
            return h.drop_after(200, image.blob, len(image.blob) // 2, {})
        h.reply(200, image.blob)

    with registry(image, reply) as server:
        run_pull(store, server)
        ranges = [s.headers.get("range") for s in server.seen if s.path == image.blob_path]
    assert ranges[0] is None and ranges[1] is not None  # it did try to resume
    assert layer_files(store, image.diff_id) == FILES
    assert leftovers(store) == []
    assert store.resolve("img")


def test_failed_download_leaves_no_layer_and_resumes_later(store):
    image = Image(FILES)
    half = len(image.blob) // 2

    def dropping(h: Handler, _count: int) -> None:
        h.drop_after(200, image.blob, half, {})

    with registry(image, dropping) as server, pytest.raises(RegistryError, match="gave up"):
        run_pull(store, server)
    assert not store.has_layer(image.diff_id)
    assert leftovers(store) == []
    assert not store.has_blob(Digest.of(image.blob))
    partial = store.ingest_dir / f"dl-{Digest.of(image.blob).hex}"
    assert partial.stat().st_size == half  # kept, to be resumed

    def resuming(h: Handler, _count: int) -> None:
        start = int(h.headers["Range"].removeprefix("bytes=").rstrip("-"))
        end = len(image.blob) - 1
        h.reply(206, image.blob[start:], {"Content-Range": f"bytes {start}-{end}/{end + 1}"})

    with registry(image, resuming) as server:
        run_pull(store, server)  # the follower reads the kept half from the file first
    assert layer_files(store, image.diff_id) == FILES
    assert leftovers(store) == []


def test_corrupt_blob_publishes_nothing(store):
    image = Image(FILES)
    bad = image.blob[:-9] + bytes(b ^ 0xFF for b in image.blob[-9:-8]) + image.blob[-8:]

    with registry(image, lambda h, _c: h.reply(200, bad)) as server:
        with pytest.raises(DigestMismatch):
            run_pull(store, server)
    assert not store.has_layer(image.diff_id)
    assert not store.has_blob(Digest.of(image.blob))
    assert leftovers(store) == []
    with pytest.raises(ImageNotFound):
        store.resolve("img")


def test_wrong_diff_id_publishes_nothing(store):
    image = Image(FILES, diff_id=Digest.of(b"something else"))

    with registry(image, lambda h, _c: h.reply(200, image.blob)) as server:
        with pytest.raises(DigestMismatch, match="DiffID"):
            run_pull(store, server)
    assert not store.has_layer(image.diff_id)
    assert not (store.layers / Digest.of(image.tar).hex).exists()
    assert leftovers(store) == []


def test_no_process_to_be_had_unpacks_after_the_download(store, monkeypatch):
    """fork refused (EAGAIN: a process limit): the layer is unpacked after its download."""
    image = Image(FILES)

    def no_fork() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with registry(image, lambda h, _c: h.reply(200, image.blob)) as server:
        result = run_pull(store, server)
    assert result.diff_ids == [image.diff_id]
    assert layer_files(store, image.diff_id) == FILES
    assert leftovers(store) == []


def test_a_layer_listed_twice(store):
    image = Image(FILES, times=2)
    with registry(image, lambda h, _c: h.reply(200, image.blob)) as server:
        result = run_pull(store, server)
    assert result.diff_ids == [image.diff_id] * 2
    assert layer_files(store, image.diff_id) == FILES
    assert leftovers(store) == []


# ----- the Follower alone --------------------------------------------------------------------
def test_follower_reads_what_is_written_and_waits_for_more(tmp_path):
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    f = Follower(Digest.of(b""))
    try:
        os.write(fd, b"abc")
        f.attach(fd, 3)
        assert f.read(2) == b"ab"
        assert f.read(10) == b"c"  # what is written is read at once, short
        got: list[bytes] = []
        waiting = threading.Thread(target=lambda: got.append(f.read(10)))
        waiting.start()
        time.sleep(0.05)
        assert waiting.is_alive()  # nothing more yet: it waits
        os.write(fd, b"def")
        f.wrote(6)
        waiting.join(WAIT)
        assert got == [b"def"]
        f.committed()
        assert f.read(10) == b""
    finally:
        f.close()
        os.close(fd)


@pytest.mark.parametrize("event", ["restarted", "writer_done", "second_attach", "cancel"])
def test_follower_breaks(tmp_path, event):
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o600)
    f = Follower(Digest.of(b""))
    try:
        if event != "writer_done":
            f.attach(fd, 0)
        errors: list[BaseException] = []

        def read() -> None:
            try:
                f.read(10)
            except FollowBroken as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.05)
        if event == "restarted":
            f.restarted()
        elif event == "writer_done":
            f.writer_done()
        elif event == "second_attach":
            f.attach(fd, 0)
        else:
            f.cancel()
        reader.join(WAIT)
        assert not reader.is_alive() and len(errors) == 1
    finally:
        f.close()
        os.close(fd)


PULL_SCRIPT = """
import sys
from imagestore.pull import pull
from imagestore.store import Store
pull(Store.open(sys.argv[1]), sys.argv[2], tls_verify=False)
"""


def test_killed_pull_leaves_no_layer_behind(store, tmp_path):
    """The unpacking child of a pull killed mid-download sees its pipe end, removes its temp
    dir and exits: no .tmp-* dir and no process stays."""
    image = Image(FILES)
    release = threading.Event()

    def reply(h: Handler, _count: int) -> None:
        send_half(h, image.blob)
        release.wait(WAIT)

    with registry(image, reply) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", PULL_SCRIPT, str(store.root), f"{server.host}/r:t"],
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + WAIT
            while not list(store.layers.glob(".tmp-*/diff/*/*")):
                assert time.monotonic() < deadline, "the unpack never started"
                assert proc.poll() is None
                time.sleep(0.01)
            children = _children(proc.pid)
            assert children, "the layer is not unpacked in a process of its own"
            proc.kill()
            proc.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while leftovers(store) or any(_alive(pid) for pid in children):
                assert time.monotonic() < deadline, f"left behind: {leftovers(store)}"
                time.sleep(0.02)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not store.has_layer(image.diff_id)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"

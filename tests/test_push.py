"""`push`: a store image to the real docker-registry (anonymous, htpasswd Basic, chunked,
cross-repository mount, skipping what the registry has) and into oci:, oci-archive: and
docker-archive: files; skopeo, umoci and our own pull must read every result."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagestore import media
from imagestore.digest import Digest
from imagestore.errors import AuthError, BadReference, ImageNotFound
from imagestore.media import Descriptor
from imagestore.pull import pull
from imagestore.push import push
from imagestore.registry import RegistryClient
from imagestore.store import Store
from tests import imagedata
from tests.registry_util import (
    Registry,
    require_tool,
    running_registry,
)
from tests.test_registry_token import PASSWORD, USER, token_registry

pytestmark = pytest.mark.usefixtures("no_real_credentials")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A store holding `sample:gzip` (three layers) and `sample:zstd` (four).

    Their layers differ: a pull skips the blob of a layer that is already unpacked, and an
    image whose blobs are not all in the store cannot be pushed."""
    work = tmp_path_factory.mktemp("images")
    s = Store.open(work / "store")
    imagedata.write_oci_layout(work / "gzip", ref="v1", compression="gzip")
    pull(s, f"oci:{work / 'gzip'}:v1", name="sample:gzip")
    layers = [
        [*entries, (f"zstd{i}.txt", "file", b"zstd\n")]
        for i, entries in enumerate([*imagedata.SAMPLE_LAYERS, []])
    ]
    imagedata.write_oci_layout(work / "zstd", layers, ref="v1", compression="zstd")
    pull(s, f"oci:{work / 'zstd'}:v1", name="sample:zstd")
    return s


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with running_registry(tmp_path_factory.mktemp("reg")) as reg:
        yield reg


class Recorder:
    """Every request RegistryClient.send makes, as (method, path-and-query)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        real = RegistryClient.send

        def send(
            client: RegistryClient, method: str, repo: str, target: str, **kw: Any
        ) -> httpx.Response:
            resp = real(client, method, repo, target, **kw)
            with self._lock:
                self.seen.append((method, resp.request.url.raw_path.decode()))
            return resp

        monkeypatch.setattr(RegistryClient, "send", send)

    def count(self, method: str, part: str = "") -> int:
        return sum(1 for m, p in self.seen if m == method and part in p)


class States:
    def __init__(self) -> None:
        self.states: dict[int, list[str]] = {}

    def layer(self, index: int, desc: Descriptor, state: str) -> None:
        self.states.setdefault(index, []).append(state)

    def progress(self, index: int, done: int, total: int | None) -> None:
        pass

    def final(self) -> list[str]:
        return [self.states[i][-1] for i in sorted(self.states)]


def skopeo(*args: str) -> dict:
    tool = require_tool("skopeo", "skopeo")
    r = subprocess.run(
        [tool, "--insecure-policy", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if args[0] == "inspect" else {}


def umoci_unpack(layout: Path, ref: str, bundle: Path) -> Path:
    tool = require_tool("umoci", "umoci")
    r = subprocess.run(
        [tool, "unpack", "--image", f"{layout}:{ref}", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return bundle / "rootfs"


def check_rootfs(rootfs: Path) -> None:
    assert (rootfs / "etc/hostname").read_bytes() == b"top\n"
    assert not (rootfs / "etc/motd").exists()
    assert (rootfs / "srv/data").read_bytes() == bytes(range(256)) * 64


def stored(store: Store, name: str) -> Digest:
    return store.resolve(name).digest


def diff_ids(store: Store, name: str) -> list[Digest]:
    data = store.read_blob(stored(store, name))
    manifest = media.parse_manifest(data, media.media_type_of(data))
    return media.diff_ids(store.read_blob(manifest.config.digest))


# ----- docker:// ---------------------------------------------------------------------------
def test_push_to_registry_then_skopeo_and_umoci(store, registry: Registry, tmp_path):
    dest = f"docker://{registry.host}/test/sample:v1"
    digest = push(store, "sample:gzip", dest)
    assert digest == stored(store, "sample:gzip")
    info = skopeo("inspect", "--tls-verify=false", dest)
    assert info["Digest"] == str(digest) and len(info["Layers"]) == 3
    skopeo("copy", "--src-tls-verify=false", dest, f"oci:{tmp_path / 'back'}:v1")
    check_rootfs(umoci_unpack(tmp_path / "back", "v1", tmp_path / "bundle"))


def test_push_twice_skips_existing_blobs(store, registry: Registry, monkeypatch):
    dest = f"{registry.host}/test/twice:v1"  # a plain reference is docker://
    push(store, "sample:zstd", dest)
    rec = Recorder(monkeypatch)
    states = States()
    push(store, "sample:zstd", dest, report=states)
    assert states.final() == ["exists"] * 5
    assert rec.count("HEAD", "/blobs/") == 5
    assert rec.count("POST") == rec.count("PATCH") == 0
    assert [p for m, p in rec.seen if m == "PUT"] == ["/v2/test/twice/manifests/v1"]


def test_chunked_upload(store, registry: Registry, monkeypatch, tmp_path):
    rec = Recorder(monkeypatch)
    dest = f"docker://{registry.host}/test/chunked:v1"
    digest = push(store, "sample:gzip", dest, threshold=100, chunk_size=256)
    data = store.read_blob(digest)
    manifest = media.parse_manifest(data, media.media_type_of(data))
    sizes = [d.size for d in [*manifest.layers, manifest.config]]
    assert max(sizes) > 512  # so at least one blob takes three chunks
    assert rec.count("PATCH") == sum(-(-n // 256) for n in sizes if n > 100)
    assert skopeo("inspect", "--tls-verify=false", dest)["Digest"] == str(digest)
    store2 = Store.open(tmp_path / "store2")
    got = pull(store2, dest)
    assert got.manifest_digest == digest and got.diff_ids == diff_ids(store, "sample:gzip")


def test_cross_repository_mount(store, registry: Registry, monkeypatch, tmp_path):
    push(store, "sample:gzip", f"{registry.host}/test/origin:v1")
    store2 = Store.open(tmp_path / "store2")
    name = f"{registry.host}/test/origin:v1"
    pull(store2, name)
    rec = Recorder(monkeypatch)
    states = States()
    digest = push(store2, name, f"{registry.host}/test/mounted:v1", report=states)
    assert states.final() == ["mounted"] * 4
    assert rec.count("POST", "mount=") == 4 and rec.count("PATCH") == 0
    info = skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/test/mounted:v1")
    assert info["Digest"] == str(digest)


def test_basic_auth(store, tmp_path):
    with running_registry(tmp_path / "reg", htpasswd=("alice", "secret")) as reg:
        dest = f"docker://{reg.host}/test/private:v1"
        with pytest.raises(AuthError, match="requires authentication"):
            push(store, "sample:gzip", dest)
        with pytest.raises(AuthError, match="alice"):
            push(store, "sample:gzip", dest, creds=("alice", "wrong"))
        digest = push(store, "sample:gzip", dest, creds=("alice", "secret"))
        info = skopeo("inspect", "--tls-verify=false", "--creds", "alice:secret", dest)
        assert info["Digest"] == str(digest)


def test_token_auth(store, tmp_path):
    """Bearer: the token asked for carries the push scope; a mount the token does not cover
    falls back to an upload."""
    with token_registry(tmp_path) as (reg, _tokens, policy):
        dest = f"docker://{reg.host}/test/pushed:v1"
        with pytest.raises(AuthError):
            push(store, "sample:gzip", dest)  # anonymous: no push
        digest = push(store, "sample:gzip", dest, creds=(USER, PASSWORD))
        assert any("repository:test/pushed:pull,push" in i.scopes for i in policy.issued)
        states = States()
        again = f"{reg.host}/test/again:v1"
        push(store, "sample:gzip", again, creds=(USER, PASSWORD), from_repo="test/pushed",
             report=states)  # fmt: skip
        assert set(states.final()) <= {"mounted", "uploaded"}
        info = skopeo("inspect", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", dest)
        assert info["Digest"] == str(digest)


def test_bad_destinations(store):
    with pytest.raises(BadReference):
        push(store, "sample:gzip", "dir:/tmp/x")
    with pytest.raises(BadReference):
        push(store, "sample:gzip", "docker://127.0.0.1:1/x@sha256:" + "0" * 64)
    with pytest.raises(ImageNotFound):
        push(store, "nothing:here", "oci:/tmp/never")


# ----- files -------------------------------------------------------------------------------
def test_push_to_oci_layout(store, tmp_path):
    layout = tmp_path / "layout"
    digest = push(store, "sample:gzip", f"oci:{layout}:one")
    push(store, "sample:zstd", f"oci:{layout}:two")
    push(store, "sample:gzip", f"oci:{layout}:two")  # replaces the older `two`
    index = json.loads((layout / "index.json").read_text())
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert sorted(refs) == ["one", "two"]
    assert skopeo("inspect", f"oci:{layout}:one")["Digest"] == str(digest)
    assert skopeo("inspect", f"oci:{layout}:two")["Digest"] == str(digest)
    check_rootfs(umoci_unpack(layout, "one", tmp_path / "bundle"))


def test_push_to_oci_archive(store, tmp_path):
    archive = tmp_path / "image.tar"
    digest = push(store, "sample:zstd", f"oci-archive:{archive}:v1")
    assert skopeo("inspect", f"oci-archive:{archive}:v1")["Digest"] == str(digest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "image.tar"]  # no debris
    store2 = Store.open(tmp_path / "store2")
    assert pull(store2, f"oci-archive:{archive}:v1").manifest_digest == digest


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_push_to_docker_archive(store, tmp_path, compression):
    archive = tmp_path / "saved.tar"
    push(store, f"sample:{compression}", f"docker-archive:{archive}:example.com/sample:v1")
    info = skopeo("inspect", f"docker-archive:{archive}")
    assert len(info["Layers"]) == len(diff_ids(store, f"sample:{compression}"))
    store2 = Store.open(tmp_path / "store2")
    got = pull(store2, f"docker-archive:{archive}")
    assert got.name == "example.com/sample:v1"
    assert got.diff_ids == diff_ids(store, f"sample:{compression}")
    # the default RepoTags come from the store name
    push(store, f"sample:{compression}", f"docker-archive:{tmp_path / 'b.tar'}")
    skopeo("copy", f"docker-archive:{tmp_path / 'b.tar'}", f"oci:{tmp_path / 'oci'}:x")
    check_rootfs(umoci_unpack(tmp_path / "oci", "x", tmp_path / "bundle"))

"""Issue 12, item 14 (the bullets after gc's verify-* dirs): tag names, a FIFO in an oci:
layout, the error for a layout with very many images, a redirect target answering 401."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imagestore.digest import Digest
from imagestore.errors import AuthError, BadReference, RegistryError
from imagestore.registry import RegistryClient
from imagestore.store import Store
from imagestore.transfer import Limits
from tests import imagedata
from tests.registry_util import FakeServer, Handler

LAYER = str(Path(sys.executable).parent / "layer")


def layer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAYER, *args], capture_output=True, text=True, timeout=60)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode not in (0, 125), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layer: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pulled(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("img")
    imagedata.write_oci_layout(tmp / "lay")
    root = tmp / "store"
    proc = layer("pull", "--root", str(root), "--name", "base", f"oci:{tmp}/lay")
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.parametrize("bad", ["", "a\nb", "a b", "tab\there", "x" * 300, "nul\x00"])
def test_tag_refuses_bad_names(pulled, bad):
    if "\x00" in bad:  # argv cannot hold a NUL: the store API must refuse it
        with pytest.raises(BadReference):
            _tag(Store.open(pulled), bad)
        return
    one_line(layer("tag", "--root", str(pulled), "base", bad))
    names = [n for n, _ in Store.open(pulled).images()]
    assert names == ["base"]


def test_pull_and_commit_refuse_bad_names_before_any_work(pulled, tmp_path):
    one_line(layer("pull", "--root", str(pulled), "--name", "a\nb", f"oci:{tmp_path}/none"))
    from imagestore.commit import commit

    with pytest.raises(BadReference):
        commit(Store.open(pulled), tmp_path, [], "base", "")


def test_fifo_in_an_oci_layout_is_refused_at_once(tmp_path):
    root = tmp_path / "lay"
    imagedata.write_oci_layout(root)
    index = json.loads((root / "index.json").read_text())
    blob = root / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    blob.unlink()
    os.mkfifo(blob)
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    t = threading.Thread(
        target=lambda: done.update(p=layer("pull", "--root", str(tmp_path / "s"), f"oci:{root}")),
        daemon=True,
    )
    t.start()
    t.join(30)
    if t.is_alive():  # the old code waits for a writer: give it one, then fail
        with open(blob, "wb"):
            pass
        t.join(30)
        pytest.fail("pull waited on a FIFO")
    assert "not a regular file" in one_line(done["p"])


def test_layout_with_many_images_gives_a_short_error(tmp_path):
    root = tmp_path / "lay"
    imagedata.write_oci_layout(root)
    index = json.loads((root / "index.json").read_text())
    entry = index["manifests"][0]
    index["manifests"] = [
        {**entry, "annotations": {"org.opencontainers.image.ref.name": f"image-{i}"}}
        for i in range(20_000)
    ]
    (root / "index.json").write_text(json.dumps(index))
    line = one_line(layer("pull", "--root", str(tmp_path / "s"), f"oci:{root}"))
    assert len(line) < 1000 and "20000 images" in line and "image-0" in line


BLOB = b"blob data" * 100
BLOB_D = Digest.of(BLOB)


@pytest.mark.parametrize("code", [401, 403])
def test_redirect_target_refusing_is_not_blamed_on_credentials(tmp_path, code):
    def cdn(h: Handler) -> None:
        h.reply(code, b"expired signature", {"WWW-Authenticate": 'Basic realm="cdn"'})

    with FakeServer(cdn) as storage:

        def registry(h: Handler) -> None:
            if h.headers.get("Authorization") != "Basic dTpw":  # u:p
                return h.reply(401, b"", {"WWW-Authenticate": 'Basic realm="reg"'})
            if h.path == "/v2/":
                return h.reply(200)
            h.reply(307, b"", {"Location": f"{storage.url}/blob?sig=1"})

        store = Store.open(tmp_path / "s")
        with (
            FakeServer(registry) as srv,
            RegistryClient(
                srv.host, creds=("u", "p"), backoff=0.01, limits=Limits(5.0, 30.0)
            ) as client,
        ):
            with pytest.raises(RegistryError) as info:
                client.fetch_blob("r", BLOB_D, len(BLOB), store)
    assert not isinstance(info.value, AuthError)
    text = str(info.value)
    assert "redirected" in text and storage.host in text and str(code) in text
    assert "credentials" not in text


def _tag(store: Store, name: str) -> None:
    with store.transaction() as txn:
        txn.tag(name, store.resolve("base"))

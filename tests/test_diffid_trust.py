"""Issue 12, item 15: a layer blob is trusted for its own DiffID only once it was decompressed
and hashed.  An image whose config names a DiffID the store already has, with a different
(hostile) blob, is refused before it is tagged; the verified blob → DiffID mapping is kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from imagestore.digest import Digest
from imagestore.store import Store
from tests import imagedata

LAYER = str(Path(sys.executable).parent / "layer")
GOOD = [[("etc/", "dir", None), ("etc/motd", "file", b"good\n")]]
EVIL = [[("etc/", "dir", None), ("etc/motd", "file", b"evil\n"), ("bin/sh", "file", b"x")]]


def layer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAYER, *args], capture_output=True, text=True, timeout=120)


def lying_layout(root: Path, claimed: str) -> None:
    """The EVIL image, its config rewritten to claim the DiffID `claimed`."""
    imagedata.write_oci_layout(root, EVIL)
    blobs = root / "blobs" / "sha256"
    index = json.loads((root / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((blobs / mdesc["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["rootfs"]["diff_ids"] = [claimed]
    data = json.dumps(config).encode()
    manifest["config"].update(digest=imagedata._put(blobs, data), size=len(data))
    data = json.dumps(manifest).encode()
    mdesc.update(digest=imagedata._put(blobs, data), size=len(data))
    (root / "index.json").write_text(json.dumps(index))


def test_a_blob_claiming_a_known_diff_id_is_refused(tmp_path):
    root = tmp_path / "store"
    imagedata.write_oci_layout(tmp_path / "good", GOOD)
    assert (
        layer("pull", "--root", str(root), "--name", "good", f"oci:{tmp_path}/good").returncode == 0
    )
    store = Store.open(root)
    (diff_id,) = [Digest("sha256", p.name) for p in store.layers.iterdir()]
    lying_layout(tmp_path / "evil", str(diff_id))
    for _ in range(2):  # the second time the hostile blob is already in the store
        proc = layer("pull", "--root", str(root), "--name", "evil", f"oci:{tmp_path}/evil")
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "decompresses to DiffID" in lines[0], proc.stderr
        assert [n for n, _ in store.images()] == ["good"]
    assert (store.layer_dir(diff_id) / "etc" / "motd").read_text() == "good\n"


def test_verified_mappings_are_recorded(tmp_path):
    store, lowers = imagedata.pulled_sample(tmp_path / "img")
    from imagestore import media

    desc = store.resolve("base")
    data = store.read_blob(desc.digest)
    manifest = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
    diff_ids = media.diff_ids(store.read_blob(manifest.config.digest))
    for blob, diff_id in zip(manifest.layers, diff_ids, strict=True):
        assert store.verified_diff_id(blob.digest) == diff_id
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "new").write_text("new")
    from imagestore.commit import commit

    commit(store, upper, lowers, "base", "next")
    data = store.read_blob(store.resolve("next").digest)
    top = media.parse_manifest(data, media.media_type_of(data)).layers[-1]
    assert store.verified_diff_id(top.digest) is not None

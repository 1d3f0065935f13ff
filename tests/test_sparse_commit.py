"""Issue 12, item 11 (first half): commit writes sparse files sparse (PAX 1.0 sparse members,
read back by our unpack with the holes kept, and by GNU tar), and bounds what one commit may
write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from imagestore import media
from imagestore.changeset import ChangesetError
from imagestore.commit import CommitOptions, commit
from imagestore.pull import image_layers
from tests import imagedata

GIB = 1 << 30


def sparse_upper(tmp_path):
    upper = tmp_path / "upper"
    (upper / "dir").mkdir(parents=True)
    big = upper / "dir" / "big"
    with open(big, "wb") as f:
        f.truncate(2 * GIB)
        f.seek(GIB)
        f.write(b"middle" * 1000)
    with open(upper / "tail", "wb") as f:  # data at the very end, a hole before it
        f.truncate(8 << 20)
        f.seek((8 << 20) - 5)
        f.write(b"last!")
    if os.stat(big).st_blocks * 512 >= GIB:
        pytest.skip("this filesystem has no holes")
    return upper


def layer_blob(store, name):
    data = store.read_blob(store.resolve(name).digest)
    manifest = media.parse_manifest(data, media.media_type_of(data))
    return store.blob_path(manifest.layers[-1].digest)


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_commit_of_a_sparse_file_is_small_and_unpacks_sparse(tmp_path, compress):
    store, lowers = imagedata.pulled_sample(tmp_path / "img")
    upper = sparse_upper(tmp_path)
    commit(store, upper, lowers, "base", "sparse", CommitOptions(compress=compress))
    blob = layer_blob(store, "sparse")
    assert blob.stat().st_size < (1 << 20)
    top = image_layers(store, "sparse")[-1]
    big = top / "dir" / "big"
    st = os.stat(big)
    assert st.st_size == 2 * GIB and st.st_blocks * 512 < 64 << 20
    with open(big, "rb") as f:
        f.seek(GIB - 3)
        assert f.read(7) == b"\0\0\0midd"
        f.seek(GIB + 6000 - 4)
        assert f.read(8) == b"ddle\0\0\0\0"
    with open(top / "tail", "rb") as f:
        f.seek((8 << 20) - 6)
        assert f.read() == b"\0last!"
    assert "GNUSparseFile" not in " ".join(str(p) for p in top.rglob("*"))
    if compress == "none" and shutil.which("tar"):  # GNU tar reads it the same
        out = tmp_path / "gnutar"
        out.mkdir()
        subprocess.run(["tar", "-xf", str(blob), "-C", str(out)], check=True, timeout=120)
        assert os.stat(out / "dir" / "big").st_size == 2 * GIB
        assert not (out / "dir" / "GNUSparseFile.0").exists()
        with open(out / "dir" / "big", "rb") as f:
            f.seek(GIB)
            assert f.read(6) == b"middle"


def test_commit_is_bounded(tmp_path, monkeypatch):
    store, lowers = imagedata.pulled_sample(tmp_path / "img")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(os.urandom(1 << 20))
    monkeypatch.setenv("LAYER_MAX_COMMIT_SIZE", str(512 << 10))
    with pytest.raises(ChangesetError, match="LAYER_MAX_COMMIT_SIZE"):
        commit(store, upper, lowers, "base", "toobig")
    assert "toobig" not in [n for n, _ in store.images()]


def test_oci_archive_is_read_in_place(tmp_path):
    """Issue 12, item 11 (second half): a small gzip'd oci-archive holding a 256 MiB member
    the index never references pulls under a 32 MiB file-size limit, writing nothing to TMPDIR
    (the old code extracted the whole archive first)."""
    import resource
    import sys
    import tarfile

    lay = tmp_path / "lay"
    imagedata.write_oci_layout(lay)
    junk = tmp_path / "junk"
    with open(junk, "wb") as f:
        f.truncate(256 << 20)
    archive = tmp_path / "img.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        tf.add(junk, arcname="blobs/sha256/unreferenced")
        tf.add(lay, arcname=".")
    assert archive.stat().st_size < 2 << 20
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))

    layer = os.path.join(os.path.dirname(sys.executable), "layer")
    proc = subprocess.run(
        [layer, "pull", "--root", str(tmp_path / "s"), "--name", "a", f"oci-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    assert proc.returncode == 0, proc.stderr
    assert list(tmpdir.iterdir()) == []

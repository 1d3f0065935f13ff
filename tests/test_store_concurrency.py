"""The store under concurrency (issue 12, item 1): one writer per ingest, across threads and
processes; two `layer pull` processes of the same image (or of images sharing a blob) from
the real registry leave a consistent store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imagestore.digest import Digest
from imagestore.errors import DigestMismatch
from imagestore.store import Store
from tests import imagedata
from tests.registry_util import require_tool, running_registry, skopeo_copy

LAYER = str(Path(sys.executable).parent / "layer")


def _blob(n: int = 1 << 20) -> tuple[bytes, Digest]:
    data = os.urandom(n)
    return data, Digest.of(data)


# ----- Ingest: one writer per key ---------------------------------------------------------
def test_second_ingest_of_a_key_waits_then_finds_the_blob(tmp_path):
    store = Store.open(tmp_path / "s")
    data, digest = _blob()
    first = store.ingest(digest, len(data), key=f"dl-{digest.hex}")
    first.write(data[:1000])
    got: list[object] = []

    def second() -> None:
        with store.ingest(digest, len(data), key=f"dl-{digest.hex}") as ing:
            got.append(ing.present)
            got.append(ing.commit())

    t = threading.Thread(target=second)
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waits for the first writer
    first.write(data[1000:])
    assert first.commit() == digest
    t.join(10)
    assert got == [True, digest]
    assert store.read_blob(digest) == data
    assert list(store.ingest_dir.iterdir()) == []


def test_a_failed_writer_leaves_a_prefix_the_next_one_resumes(tmp_path):
    store = Store.open(tmp_path / "s")
    data, digest = _blob()
    with pytest.raises(RuntimeError):
        with store.ingest(digest, len(data), key="k") as ing:
            ing.write(data[:5000])
            raise RuntimeError("connection dropped")
    with store.ingest(digest, len(data), key="k") as ing:
        assert ing.offset == 5000 and not ing.present
        ing.write(data[5000:])
        assert ing.commit() == digest
    assert store.read_blob(digest) == data


def test_bytes_appended_behind_the_writers_back_are_refused(tmp_path):
    store = Store.open(tmp_path / "s")
    data, digest = _blob(4096)
    with store.ingest(None, None, key="k") as ing:
        ing.write(data)
        with open(store.ingest_dir / "k", "ab") as rogue:  # ignores the lock
            rogue.write(b"x" * 8192)
        with pytest.raises(DigestMismatch, match="another writer"):
            ing.commit()
    assert not store.has_blob(digest) and list(store.blobs.iterdir()) == []


# ----- real concurrent pulls --------------------------------------------------------------
def _layer(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LAYER, *args, "--root", str(root)], capture_output=True, text=True, timeout=120
    )


def _assert_consistent(root: Path, names: list[str]) -> None:
    for blob in (root / "blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    r = _layer(root, "images")
    assert r.returncode == 0, r.stderr
    for name in names:
        r = _layer(root, "inspect", name)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["layers"]) == 2
    r = _layer(root, "gc")
    assert r.returncode == 0, r.stderr
    assert list((root / "ingest").iterdir()) == []


@pytest.fixture(scope="module")
def shared_blob_registry(tmp_path_factory):
    require_tool("skopeo", "skopeo")
    tmp = tmp_path_factory.mktemp("concurrent")
    big = [("big", "file", os.urandom(12 << 20))]  # random: gzip keeps it big
    for tag in ("a", "b"):
        imagedata.write_oci_layout(tmp / tag, [big, [(f"{tag}.txt", "file", tag.encode())]])
    with running_registry(tmp / "reg") as reg:
        for tag in ("a", "b"):
            skopeo_copy(f"oci:{tmp / tag}:latest", f"docker://{reg.host}/t/img:{tag}")
        yield reg


@pytest.mark.parametrize("tags", [("a", "a")] * 3 + [("a", "b")] * 2)
def test_two_pulls_at_once_leave_a_consistent_store(tmp_path, shared_blob_registry, tags):
    host = shared_blob_registry.host
    root = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                LAYER,
                "pull",
                "-q",
                "--tls-verify",
                "false",
                f"docker://{host}/t/img:{tag}",
                "--name",
                f"{tag}{i}",
                "--root",
                str(root),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, tag in enumerate(tags)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    _assert_consistent(root, [f"{tag}{i}" for i, tag in enumerate(tags)])


# ----- gc and the debris of interrupted work ----------------------------------------------
def test_gc_removes_verify_scratch_dirs_and_lock_debris(tmp_path):
    """An interrupted `commit --verify` leaves ingest/verify-* trees (issue 12, item 14)."""
    root = tmp_path / "store"
    store = Store.open(root)
    scratch = store.ingest_dir / "verify-0123456789abcdef"
    (scratch / "etc/ro").mkdir(parents=True)
    (scratch / "etc/ro/file").write_bytes(b"x" * 100)
    os.chmod(scratch / "etc/ro", 0o555)  # as a layer's read-only directory
    (store.ingest_dir / "dl-partial").write_bytes(b"partial")
    r = _layer(root, "gc")
    assert r.returncode == 0, r.stderr
    assert list(store.ingest_dir.iterdir()) == []


def test_gc_refuses_a_damaged_mount_record_rather_than_drop_its_pin(tmp_path):
    root = tmp_path / "store"
    store = Store.open(root)
    data, digest = _blob(100)
    store.put_bytes(data)
    (store.mounts / "m").mkdir()
    (store.mounts / "m/mount.json").write_text('{"image": 3}')
    r = _layer(root, "gc")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "mount.json is damaged" in r.stderr
    assert store.has_blob(digest)

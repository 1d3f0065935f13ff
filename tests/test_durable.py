"""durable.AtomicFile: the old file or the complete verified new one, never debris."""

import hashlib

import pytest

from imagestore import durable
from imagestore.digest import Digest
from imagestore.errors import DigestMismatch


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def test_publishes_verified_content(tmp_path):
    dest = tmp_path / "blob"
    with durable.AtomicFile(dest, expected=_digest(b"hello"), size=5) as f:
        f.write(b"hel")
        f.write(b"lo")
    assert dest.read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


@pytest.mark.parametrize(
    "expected, size", [(_digest(b"other"), None), (None, 4), (_digest(b"hello"), 6)]
)
def test_a_mismatch_keeps_the_old_file_and_leaves_no_temp(tmp_path, expected, size):
    dest = tmp_path / "doc"
    dest.write_bytes(b"old")
    with pytest.raises(DigestMismatch), durable.AtomicFile(dest, expected=expected, size=size) as f:
        f.write(b"hello")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["doc"]


def test_an_exception_in_the_block_publishes_nothing(tmp_path):
    dest = tmp_path / "doc"
    with pytest.raises(RuntimeError), durable.AtomicFile(dest) as f:
        f.write(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces(tmp_path):
    dest = tmp_path / "index.json"
    durable.write_atomic(dest, b"one")
    durable.write_atomic(dest, b"two")
    assert dest.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["index.json"]

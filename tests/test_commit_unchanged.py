"""Commit leaves out what the upper holds exactly as below (imagestore.unchanged): a copy-up
written back with the same bytes and metadata is not a change of the image's tree.  Through
a real mount, then the new layer's tar, `--verify`, and a mount of the new image; and the
predicate itself, with and without a layer's fingerprints."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from imagestore import fingerprints
from imagestore.commit import CommitOptions, commit
from imagestore.digest import Digest
from imagestore.pull import image_layers
from imagestore.unchanged import Unchanged
from tests import imagedata, treecmp
from tests.mounts import LayerfsMount, require_fuse, require_root

MTIME_NS = imagedata.MTIME * 10**9


def _rewrite(path: Path, data: bytes, mtime_ns: int | None = MTIME_NS) -> None:
    """Write `data` over `path` (a copy-up), then set its mtime back (as dpkg does)."""
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_fuse()
    tmp = tmp_path_factory.mktemp("unchanged")
    store, lowers = imagedata.pulled_sample(tmp)
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with LayerfsMount(mnt, list(reversed(lowers)), upper, work):
        # the same as below: left out (bottom layer, top layer, a symlink)
        _rewrite(mnt / "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        _rewrite(mnt / "etc/hostname", b"top\n")
        os.unlink(mnt / "usr/bin/t")
        os.symlink("tool", mnt / "usr/bin/t")
        os.utime(mnt / "usr/bin/t", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
        # changed: kept
        _rewrite(mnt / "etc/new.conf", b"new\n", mtime_ns=None)  # only its mtime
        _rewrite(mnt / "var/cache/fresh", b"FRESH")  # same size and mtime, other bytes
        _rewrite(mnt / "srv/data", bytes(range(256)) * 64)
        os.setxattr(mnt / "srv/data", "user.note", b"x")  # only an xattr
        _rewrite(mnt / "usr/bin/tool", b"#!/bin/sh\necho tool\n")  # below: a hard link
        os.utime(mnt / "usr/bin/tool", ns=(MTIME_NS, MTIME_NS))
        view = treecmp.snapshot(mnt)
    new = commit(
        store, upper, lowers, "base", "new", CommitOptions(source_date_epoch=1, verify=True)
    )
    return {"tmp": tmp, "store": store, "lowers": lowers, "upper": upper, "view": view, "new": new}


def _layer_members(store, manifest: Digest) -> dict[str, tarfile.TarInfo]:
    m = json.loads(store.read_blob(manifest))
    blob = store.read_blob(Digest.parse(m["layers"][-1]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {t.name: t for t in tar.getmembers()}


def test_the_same_is_left_out(env):
    members = _layer_members(env["store"], env["new"])
    for gone in ("etc/passwd", "etc/hostname", "usr/bin/t"):
        assert gone not in members, gone
    for kept in ("etc/new.conf", "var/cache/fresh", "srv/data", "usr/bin/tool"):
        assert kept in members, kept
    assert members["srv/data"].pax_headers["SCHILY.xattr.user.note"] == "x"
    for d in ("etc", "usr", "usr/bin", "var/cache", "srv"):  # directories always stay
        assert members[d].isdir(), d


def test_the_new_image_shows_the_same_tree(env, tmp_path):
    layers = image_layers(env["store"], "new")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with LayerfsMount(mnt, list(reversed(layers))):
        got = treecmp.snapshot(mnt)
        st = os.lstat(mnt / "etc/passwd")
    view = {k: v for k, v in env["view"].items() if k != b"/"}
    got = {k: v for k, v in got.items() if k != b"/"}
    assert treecmp.diff(got, view, compare_mtime=False) == []
    assert st.st_mtime_ns == MTIME_NS  # the lower file's, which was the upper's too


# ----- the predicate -------------------------------------------------------------------------
def _pair(tmp: Path, name: str, data: bytes, upper_data: bytes | None = None):
    lower, upper = tmp / "lower" / name, tmp / "upper" / name
    for p in (lower, upper):
        p.parent.mkdir(parents=True, exist_ok=True)
    lower.write_bytes(data)
    os.utime(lower, ns=(MTIME_NS, MTIME_NS))
    shutil.copy2(lower, upper)
    if upper_data is not None:
        upper.write_bytes(upper_data)
        os.utime(upper, ns=(MTIME_NS, MTIME_NS))
    return upper, lower


def _ask(same: Unchanged, upper: Path, lower: Path) -> bool:
    return same(bytes(upper), os.lstat(upper), bytes(lower), os.lstat(lower))


def test_bytes_compared_without_fingerprints(tmp_path):
    same = Unchanged([tmp_path / "lower"], [None])
    assert _ask(same, *_pair(tmp_path, "a", b"abc" * 100_000))
    assert not _ask(same, *_pair(tmp_path, "b", b"abc", b"abd"))  # same size and mtime
    upper, lower = _pair(tmp_path, "c", b"abc")
    os.chmod(upper, 0o600)
    assert not _ask(same, upper, lower)
    upper, lower = _pair(tmp_path, "d", b"abc")
    os.link(lower, tmp_path / "lower/d2")
    assert not _ask(same, upper, lower)  # a lower hard link keeps its group
    upper, lower = _pair(tmp_path, "e", b"abc")
    os.setxattr(upper, "user.x", b"1")
    assert not _ask(same, upper, lower)
    os.setxattr(lower, "user.x", b"1")
    assert _ask(same, upper, lower)
    assert same.left_out == 2


def test_sparse_upper_is_kept(tmp_path):
    upper, lower = _pair(tmp_path, "s", b"")
    for p in (upper, lower):
        os.truncate(p, 8 << 20)
        os.utime(p, ns=(MTIME_NS, MTIME_NS))
    assert not _ask(Unchanged([tmp_path / "lower"], [None]), upper, lower)


def test_fingerprints_answer_for_the_lower_file(tmp_path):
    """With a fingerprints file, the upper's xxh3 is compared with the recorded one (the
    lower file is not read) — but only while the record matches the lower file's metadata."""
    upper, lower = _pair(tmp_path, "f", b"hello")
    st = os.lstat(lower)

    def record(digest: bytes, size: int = st.st_size) -> Path:
        path = tmp_path / "fingerprints"
        entry = fingerprints.Entry(
            b"f", st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, digest=digest
        )
        fingerprints.write(path, [entry], sync=False)
        return path

    h = fingerprints.new_hasher()
    h.update(b"hello")
    good, stale = h.digest(), bytes(16)
    assert _ask(Unchanged([tmp_path / "lower"], [record(good)]), upper, lower)
    # a record saying other bytes wins over the lower file itself: it is what is compared
    assert not _ask(Unchanged([tmp_path / "lower"], [record(stale)]), upper, lower)
    # a record that does not describe the lower file any more is not trusted: bytes compared
    assert _ask(Unchanged([tmp_path / "lower"], [record(stale, size=99)]), upper, lower)
    # an unreadable fingerprints file: bytes compared
    (tmp_path / "fingerprints").write_bytes(b"junk")
    assert _ask(Unchanged([tmp_path / "lower"], [tmp_path / "fingerprints"]), upper, lower)

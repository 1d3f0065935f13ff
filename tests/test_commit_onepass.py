"""Commit in one pass (issue 16, item 2): the new layer's unpacked directory is built while the
changeset tar is written (`imagestore.layerbuild`), and must be exactly the tree — and the
fingerprints — that unpacking the committed blob gives; the blob is never read back."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from imagestore import fingerprints, layerbuild, media, unpack
from imagestore.commit import CommitOptions, commit
from imagestore.digest import Digest
from imagestore.errors import ImageNotFound
from imagestore.store import Store
from tests import imagedata, treecmp
from tests.layerdata import write
from tests.mounts import LayerfsMount, require_fuse, require_root

SDE = 1_700_000_000
MIB = 1 << 20


def _mutate(m: Path) -> None:
    """Every kind of change a layer can carry, made through a real mount of the sample."""
    os.unlink(m / "etc/hostname")  # whiteout
    shutil.rmtree(m / "var/cache")  # a whited-out lower directory
    shutil.rmtree(m / "run")  # directory re-created: opaque
    write(m / "run/fresh", b"fresh")
    with open(m / "etc/passwd", "ab") as f:  # copy-up
        f.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
    os.setxattr(m / "etc/passwd", "user.binary", b"\x00\xff\xfe value")
    os.chown(m / "etc/passwd", 3_000_000, 3_000_001)  # past ustar's octal fields: PAX
    os.rename(m / "etc", m / "etc-moved")  # a directory merged from 3 layers moved: redirect
    write(m / "etc-moved/added", b"added in a moved dir")
    os.rename(m / "usr/bin", m / "usr/sbin")
    os.unlink(m / "usr/sbin/t")
    os.link(m / "usr/sbin/tool", m / "usr/sbin/tool3")  # one more name of a lower link group
    os.chmod(m / "usr/sbin/tool2", 0o4755)
    os.mkdir(m / "lib")
    os.rename(m / "srv", m / "lib/srv")  # moved one level down
    write(m / "new/a", b"hard-linked")
    os.mkdir(m / "new/deeper")
    os.link(m / "new/a", m / "new/deeper/c")
    os.symlink("../etc/passwd", m / "new/link")
    os.mkfifo(m / "new/fifo")
    os.mknod(m / "new/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkdir(m / "new/xdir")
    os.setxattr(m / "new/xdir", "user.dirattr", b"on a new dir")
    os.setxattr(m / "new/xdir", "trusted.t", b"trusted")
    long_dir = m / "new" / ("d" * 120) / ("e" * 120)  # past ustar's 100-byte name: PAX path
    write(long_dir / ("f" * 200), b"long")
    raw = os.fsencode(m / "new") + b"/bytes-\xff\xfe"  # not UTF-8
    write(Path(os.fsdecode(raw)), b"raw name")
    write(m / "new/old", b"before 1970")
    os.utime(m / "new/old", (-86400, -86400))  # a time before 1970, through the mount
    with open(m / "new/sparse", "wb") as f:  # holes around data, a trailing hole
        f.truncate(64 * MIB)
        f.seek(8 * MIB)
        f.write(b"data" * 4096)
        f.seek(32 * MIB)
        f.write(os.urandom(MIB))
    os.chmod(m / "opt", 0o700)  # metadata-only copy-up of a directory


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_fuse()
    tmp = tmp_path_factory.mktemp("onepass")
    store, lowers = imagedata.pulled_sample(tmp)
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with LayerfsMount(mnt, list(reversed(lowers)), upper, work):
        _mutate(mnt)
    return {"tmp": tmp, "store": store, "lowers": lowers, "upper": upper}


def _new_layer(store: Store, name: str) -> tuple[Digest, str, Digest]:
    """(blob, media type, DiffID) of image `name`'s top layer."""
    data = store.read_blob(store.resolve(name).digest)
    manifest = media.parse_manifest(data, media.media_type_of(data))
    config = store.read_json(manifest.config.digest)
    top = manifest.layers[-1]
    return top.digest, top.media_type, Digest.parse(config["rootfs"]["diff_ids"][-1])


def _unpacked_again(store: Store, name: str) -> tuple[Path, Path]:
    """The committed layer's tree as published, and as `unpack` makes it from the blob."""
    blob, media_type, diff_id = _new_layer(store, name)
    assert store.has_layer(diff_id)
    tmp, got = unpack.unpack_fresh(store, blob, media_type, diff_id)
    assert got == diff_id
    return store.layers / diff_id.hex, tmp


def _same_tree(one: Path, two: Path) -> list[str]:
    """Differences between two unpacked layer dirs, their fingerprints included.  The times a
    tar does not set are left out: the root's (never an entry) and the whiteouts' (made when
    the tree is), which differ between any two unpacks of the same blob."""
    a, b = treecmp.snapshot(one / "diff"), treecmp.snapshot(two / "diff")
    unset = {p for p, o in b.items() if p == b"/" or (o.kind == "chardev" and o.rdev == 0)}
    for tree in (a, b):
        for p in unset & set(tree):
            tree[p].mtime_ns = 0
    problems = treecmp.diff(a, b, merged_dir_nlink_one=False)
    problems += treecmp.link_group_problems(a, b)
    fa, fb = (
        [
            e._replace(mtime_ns=0) if b"/" + e.path in unset or not e.path else e
            for e in fingerprints.read(d / "fingerprints")
        ]
        for d in (one, two)
    )
    if fa != fb:
        problems.append(f"the fingerprints differ: {[x for x in fa if x not in fb]}")
    return problems


def _debris(store: Store) -> list[str]:
    return [p.name for p in store.layers.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_layer_dir_equals_the_unpacked_blob(env, compress):
    store = env["store"]
    name = f"onepass-{compress}"
    opts = CommitOptions(compress=compress, source_date_epoch=SDE + (compress == "zstd"))
    commit(store, env["upper"], env["lowers"], "base", name, opts)
    ours, theirs = _unpacked_again(store, name)
    try:
        assert _same_tree(ours, theirs) == []
        tree = treecmp.snapshot(ours / "diff")
        # the test covers what it claims: every kind of entry made it into the layer
        kinds = {o.kind for o in tree.values()}
        assert {"dir", "file", "symlink", "fifo", "chardev"} <= kinds
        assert tree[b"/etc"].kind == "chardev" and tree[b"/etc"].rdev == 0  # a whiteout
        assert tree[b"/new/a"].nlink == 2 and tree[b"/usr/sbin/tool3"].nlink == 2
        assert b"trusted.overlay.opaque" in tree[b"/run"].xattrs
        assert tree[b"/etc-moved/added"].kind == "file"
        assert tree[b"/etc-moved/passwd"].uid == 3_000_000
        assert tree[b"/new/old"].mtime_ns == -86400 * 10**9
        assert tree[b"/new/xdir"].xattrs[b"user.dirattr"] == b"on a new dir"
        assert b"/new/bytes-\xff\xfe" in tree
        sparse_file = os.stat(ours / "diff/new/sparse")
        assert sparse_file.st_size == 64 * MIB and sparse_file.st_blocks * 512 < 4 * MIB
        # holes are kept at least where unpack keeps them
        assert sparse_file.st_blocks <= os.stat(theirs / "diff/new/sparse").st_blocks
    finally:
        unpack.remove_tree(theirs)
    assert _debris(store) == []


def test_blob_is_never_read_back(env, tmp_path, monkeypatch):
    """Every way into a blob (the store's reader, open(), os.open()) is watched, in this
    process and in the build's child (which inherits the watch and appends to one file)."""
    store = env["store"]
    log = tmp_path / "opened"
    real_open_blob, real_open, real_os_open = Store.open_blob, builtins.open, os.open

    def seen(path) -> None:
        fd = real_os_open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, os.fsencode(os.path.abspath(path)) + b"\n")
        finally:
            os.close(fd)

    def open_blob(self, digest):
        seen(self.blob_path(digest))
        return real_open_blob(self, digest)

    def watched_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen(file)
        return real_open(file, *args, **kwargs)

    def watched_os_open(path, *args, **kwargs):
        if kwargs.get("dir_fd") is None or os.path.isabs(path):  # where dir_fd plays no part
            seen(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(Store, "open_blob", open_blob)
    monkeypatch.setattr(builtins, "open", watched_open)
    monkeypatch.setattr(os, "open", watched_os_open)
    commit(store, env["upper"], env["lowers"], "base", "unread", CommitOptions(message="unread"))
    monkeypatch.undo()
    blob, _, diff_id = _new_layer(store, "unread")
    assert store.has_layer(diff_id)
    opened = [os.fsdecode(p) for p in log.read_bytes().splitlines()]
    assert str(store.blob_path(blob)) not in opened
    assert any(p.startswith(str(store.blobs)) for p in opened)  # the watch saw the base's
    assert opened.count(str(env["upper"] / "run/fresh")) == 2  # read for the tar, then copied


def _calls(path: Path) -> int:
    """Calls counted by `_count` (in this process or in the build's child)."""
    return len(path.read_bytes()) if path.exists() else 0


def _count(path: Path) -> int:
    """Count one call in `path` (one byte, O_APPEND: the child's count is seen here too);
    the count so far, this one included."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return _calls(path)


def test_read_write_fallback_gives_the_same_tree(env, tmp_path, monkeypatch):
    """Where copy_file_range is refused (across filesystems), read/write copies the data."""
    store, lowers = imagedata.pulled_sample(tmp_path)
    upper = tmp_path / "upper"
    subprocess.run(["cp", "-a", str(env["upper"]), str(upper)], check=True)
    calls = tmp_path / "calls"

    def refused(*args, **kwargs):
        _count(calls)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(layerbuild.os, "copy_file_range", refused)
    commit(store, upper, lowers, "base", "rw", CommitOptions(source_date_epoch=SDE + 7))
    monkeypatch.undo()
    assert _calls(calls)
    ours, theirs = _unpacked_again(store, "rw")
    try:
        assert _same_tree(ours, theirs) == []
    finally:
        unpack.remove_tree(theirs)


def test_without_fork_the_caller_builds_the_same_tree(env, tmp_path, monkeypatch):
    """Where fork is refused, the members are applied in the committing process: the same
    tree and fingerprints."""
    store, lowers = imagedata.pulled_sample(tmp_path)

    def refused():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(layerbuild.os, "fork", refused)
    commit(store, env["upper"], lowers, "base", "nofork", CommitOptions(source_date_epoch=SDE))
    monkeypatch.undo()
    ours, theirs = _unpacked_again(store, "nofork")
    try:
        assert _same_tree(ours, theirs) == []
    finally:
        unpack.remove_tree(theirs)
    assert _debris(store) == []


def _watch_forks(monkeypatch) -> list[int]:
    """The pids of the build's children, to check that each was waited for."""
    pids: list[int] = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(layerbuild.os, "fork", fork)
    return pids


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("where", ["child", "writer"])
def test_interrupted_while_writing_leaves_nothing(env, tmp_path, monkeypatch, where):
    """Interrupted in the child that applies the members, or in the process writing the tar."""
    store = env["store"]
    blobs_before = set(os.listdir(store.blobs))
    layers_before = set(os.listdir(store.layers))
    cls, method = (
        (layerbuild._Applier, "write_to") if where == "child" else (layerbuild.LayerBuild, "add")
    )
    real, calls = getattr(cls, method), tmp_path / "calls"

    def interrupted(self, *args):
        if _count(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(cls, method, interrupted)
    pids = _watch_forks(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        commit(store, env["upper"], env["lowers"], "base", "cut", CommitOptions(message="cut"))
    assert _calls(calls) >= 5
    with pytest.raises(ImageNotFound):
        store.resolve("cut")
    assert set(os.listdir(store.blobs)) == blobs_before
    assert set(os.listdir(store.layers)) == layers_before
    assert not [p for p in store.ingest_dir.iterdir() if p.name.startswith("tmp-")]
    assert len(pids) == 1 and _reaped(pids[0])


def test_a_failure_in_the_child_is_the_commits_error(env, monkeypatch):
    """The child cannot write (a full disk): commit raises that error, and nothing stays."""
    store = env["store"]
    blobs_before = set(os.listdir(store.blobs))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layerbuild.os, "copy_file_range", full)
    pids = _watch_forks(monkeypatch)
    with pytest.raises(OSError) as caught:
        commit(store, env["upper"], env["lowers"], "base", "full", CommitOptions(message="full"))
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert set(os.listdir(store.blobs)) == blobs_before
    assert _debris(store) == []
    assert len(pids) == 1 and _reaped(pids[0])


def test_a_failed_sync_is_the_commits_error(env, monkeypatch):
    """syncfs of the new layer runs in a thread of the child while the fingerprints are
    taken; its failure (EIO: the disk) is the commit's error, and nothing stays."""
    store = env["store"]
    blobs_before = set(os.listdir(store.blobs))

    def failing(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(layerbuild, "syncfs", failing)
    with pytest.raises(OSError) as caught:
        commit(store, env["upper"], env["lowers"], "base", "eio", CommitOptions(message="eio"))
    monkeypatch.undo()
    assert caught.value.errno == errno.EIO
    with pytest.raises(ImageNotFound):
        store.resolve("eio")
    assert set(os.listdir(store.blobs)) == blobs_before
    assert _debris(store) == []


def test_child_whose_parent_is_gone_removes_its_dir(env):
    """The pipe ends without the end mark (the committing process died): the child removes
    the temp dir itself, as nobody else will."""
    build = layerbuild.LayerBuild(env["store"])
    assert (build.tmp / "diff").is_dir()
    os.close(build._feed)  # what the kernel does for a parent that dies
    build._feed = -1
    with pytest.raises(Exception, match="stopped before the layer's last member"):
        build.finish()
    assert not build.tmp.exists()
    build.discard()


def test_same_layer_again_keeps_the_published_one(env):
    """A second commit of the same changes finds its layer in the store: its own copy goes."""
    store = env["store"]
    opts = CommitOptions(source_date_epoch=SDE)
    commit(store, env["upper"], env["lowers"], "base", "first", opts)
    _, _, diff_id = _new_layer(store, "first")
    marker = store.layers / diff_id.hex / "complete"
    before = marker.stat().st_mtime_ns
    commit(store, env["upper"], env["lowers"], "base", "second", opts)
    assert _new_layer(store, "second")[2] == diff_id
    assert marker.stat().st_mtime_ns == before  # not replaced
    assert _debris(store) == []
    index = json.loads((store.root / "index.json").read_text())
    assert len(index["manifests"]) >= 2

"""Names and paths at the kernel's limits: names longer than NAME_MAX give ENAMETOOLONG, paths
longer than PATH_MAX work (upper and lower), and a mount over its own lower layer serves.

Deep trees are built and read with chains of directory fds (`os.open(name, dir_fd=…)`): no
path string past PATH_MAX is ever handed to the kernel, exactly as pjdfstest's */03.t do it.
Every wait on a mount is bounded (subprocess timeouts, the fixtures' deadlines).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mounts import LayerfsMount, require_fuse
from unionfs import control

LONG = b"n" * 256  # one byte over NAME_MAX
MAX = b"m" * 255
LEVEL = 250  # bytes per directory name of a deep chain
DEPTH = 20  # 20 × 251 bytes: past PATH_MAX (4,096) by far
TIMEOUT = 20  # seconds any one command on a mount may take


def level_names(depth: int = DEPTH) -> list[bytes]:
    return [b"%03d" % i + b"d" * (LEVEL - 3) for i in range(depth)]


@contextmanager
def deep_dir(top: str | os.PathLike[str], names: list[bytes], create: bool) -> Iterator[int]:
    """An O_RDONLY fd of top/names[0]/…/names[-1], made level by level when `create`."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            if create:
                os.mkdir(name, 0o755, dir_fd=fd)
            new = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        yield fd
    finally:
        os.close(fd)


def write_at(dfd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_at(dfd: int, name: bytes) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


# ----- fsat.Roots without a mount -----------------------------------------------------------
def test_roots_reach_past_path_max(tmp_path):
    from unionfs.fsat import PLAIN, Roots

    names = level_names()
    with deep_dir(tmp_path, names, create=True) as dfd:
        write_at(dfd, b"f", b"deep data")
        os.setxattr(b"/proc/self/fd/%d/f" % dfd, b"user.k", b"v")
        os.symlink(b"f", b"s", dir_fd=dfd)
    root = os.fsencode(tmp_path)
    deep = root + b"/" + b"/".join(names)
    assert len(deep) > 4096
    fs = Roots()
    fs.add(root)
    assert stat.S_ISREG(fs.lstat(deep + b"/f").st_mode)
    assert fs.readlink(deep + b"/s") == b"f"
    assert fs.getxattr(deep + b"/f", b"user.k") == b"v"
    assert "user.k" in fs.listxattr(deep + b"/f")
    fs.rename(deep + b"/f", deep + b"/g")
    fs.link(deep + b"/g", root + b"/top")
    assert fs.lstat(root + b"/top").st_nlink == 2
    with fs.scandir(deep) as it:
        assert sorted(de.name for de in it) == [b"g", b"s"]
    fd = fs.open(deep + b"/g", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"deep data"
    finally:
        os.close(fd)
    assert PLAIN.lstat(deep + b"/g").st_ino == fs.lstat(root + b"/top").st_ino
    assert [p for p, _ in fs.walk_stat(root) if p.endswith(b"/s")] == [deep + b"/s"]
    with pytest.raises(OSError) as exc:
        fs.lstat(b"/not/under/a/root")
    assert exc.value.errno == errno.EXDEV
    fs.close()


def test_lower_beyond_path_max_in_the_model(tmp_path):
    from unionfs.stack import LayerStack

    lower = tmp_path / "lower"
    lower.mkdir()
    names = level_names()
    with deep_dir(lower, names, create=True) as dfd:
        write_at(dfd, b"f", b"x")
    stack = LayerStack([str(lower)])
    node = stack.root
    for name in names:
        node = stack.lookup(node, name)
    assert list(stack.listing(node)) == [b"f"]
    assert stack.stat(stack.lookup(node, b"f")).st_size == 1


# ----- real mounts ----------------------------------------------------------------------------
class Union:
    def __init__(self, root: Path) -> None:
        self.lower, self.upper = root / "lower", root / "upper"
        self.work, self.mnt = root / "work", root / "mnt"
        for d in (self.lower, self.upper, self.work, self.mnt):
            d.mkdir()


@pytest.fixture(scope="module")
def union(tmp_path_factory) -> Iterator[Union]:
    require_fuse()
    u = Union(tmp_path_factory.mktemp("paths"))
    with deep_dir(u.lower, [b"deep", *level_names()], create=True) as dfd:
        write_at(dfd, b"lowf", b"lower data\n")
    (u.lower / "dir").mkdir()
    (u.lower / "dir" / "file").write_bytes(b"x")
    with LayerfsMount(u.mnt, [u.lower], u.upper, u.work):
        yield u


def _calls(d: Path) -> dict[str, Callable[[], object]]:
    long, existing = os.path.join(os.fsencode(d), LONG), os.fsencode(d / "file")
    return {
        "stat": lambda: os.stat(long),
        "lstat": lambda: os.lstat(long),
        "chmod": lambda: os.chmod(long, 0o644),
        "chown": lambda: os.chown(long, 0, 0),
        "truncate": lambda: os.truncate(long, 0),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
        "rename_from": lambda: os.rename(long, existing + b".new"),
        "rename_to": lambda: os.rename(existing, long),
        "link_to": lambda: os.link(existing, long),
        "open": lambda: os.open(long, os.O_RDONLY),
        "open_creat": lambda: os.open(long, os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(long),
        "mkfifo": lambda: os.mkfifo(long),
        "symlink": lambda: os.symlink(b"target", long),
    }


CALLS = list(_calls(Path("/")).keys())


@pytest.mark.mount
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("where", ["upper_dir", "lower_dir"])
def test_name_over_name_max_gives_enametoolong(union, call, where):
    d = union.mnt / ("up-" + call if where == "upper_dir" else "dir")
    if where == "upper_dir":
        d.mkdir()
        (d / "file").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        _calls(d)[call]()
    assert exc.value.errno == errno.ENAMETOOLONG, (call, exc.value)
    assert (d / "file").read_bytes() == b"x"  # nothing moved or changed


@pytest.mark.mount
def test_name_of_name_max_bytes_works(union):
    d = union.mnt / "max"
    d.mkdir()
    p = os.path.join(os.fsencode(d), MAX)
    with open(p, "wb") as f:
        f.write(b"ok")
    assert os.stat(p).st_size == 2
    os.rename(p, p[:-1])
    assert os.listdir(d) == [os.fsdecode(MAX[:-1])]
    assert (union.upper / "max" / os.fsdecode(MAX[:-1])).read_bytes() == b"ok"


@pytest.mark.mount
def test_upper_path_beyond_path_max(union):
    names = [b"up-deep", *level_names()]
    with deep_dir(union.mnt, names, create=True) as dfd:
        write_at(dfd, b"f", b"deep data")
        st = os.stat(b"f", dir_fd=dfd)
        assert st.st_size == 9
        os.rename(b"f", b"g", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.link(b"g", b"h", src_dir_fd=dfd, dst_dir_fd=dfd)
        assert os.stat(b"h", dir_fd=dfd).st_nlink == 2
        os.chmod(b"h", 0o600, dir_fd=dfd)
        os.unlink(b"g", dir_fd=dfd)
        os.mkdir(b"sub", dir_fd=dfd)
        os.rmdir(b"sub", dir_fd=dfd)
        assert sorted(os.listdir(dfd)) == ["h"]
        assert read_at(dfd, b"h") == b"deep data"
    with deep_dir(union.upper, names, create=False) as ufd:  # it really is in the upper
        assert read_at(ufd, b"h") == b"deep data"
        assert stat.S_IMODE(os.stat(b"h", dir_fd=ufd).st_mode) == 0o600
        assert sorted(os.listdir(ufd)) == ["h"]
    # a directory high up the chain renamed: everything below moves with it
    with deep_dir(union.mnt, names[:1], create=False) as top:
        os.rename(names[1], b"moved", src_dir_fd=top, dst_dir_fd=top)
    with deep_dir(union.mnt, [names[0], b"moved", *names[2:]], create=False) as dfd:
        assert read_at(dfd, b"h") == b"deep data"
        os.unlink(b"h", dir_fd=dfd)
        assert os.listdir(dfd) == []


@pytest.mark.mount
def test_lower_beyond_path_max_is_listed_read_and_copied_up(union):
    names = [b"deep", *level_names()]
    with deep_dir(union.mnt, names, create=False) as dfd:
        assert os.listdir(dfd) == ["lowf"]
        assert read_at(dfd, b"lowf") == b"lower data\n"
        fd = os.open(b"lowf", os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
        try:
            os.write(fd, b"more\n")
        finally:
            os.close(fd)
        assert read_at(dfd, b"lowf") == b"lower data\nmore\n"
    with deep_dir(union.upper, names, create=False) as ufd:  # copied up, ancestors too
        assert read_at(ufd, b"lowf") == b"lower data\nmore\n"
    with deep_dir(union.lower, names, create=False) as lfd:
        assert read_at(lfd, b"lowf") == b"lower data\n"
    found = subprocess.run(
        ["find", str(union.mnt / "deep"), "-name", "lowf"], capture_output=True, timeout=TIMEOUT
    )
    assert found.stdout.count(b"/lowf\n") == 1, found.stderr


# ----- a mount over its own lower ---------------------------------------------------------
def _run(mount: LayerfsMount, *cmd: str) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` against the mount, bounded: a command stuck on a deadlocked daemon cannot
    even be killed (it may wait on an inode lock), so on timeout the daemon is stopped first
    (its pending requests then fail), and the test fails."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        mount.stop()
        proc.communicate(timeout=TIMEOUT)
        pytest.fail(f"{cmd} hung on the mount: {mount.log()}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.mount
def test_mount_over_its_own_lower(tmp_path, fuse):
    d = tmp_path / "d"
    (d / "dir").mkdir(parents=True)
    (d / "file").write_bytes(b"hello\n")
    (d / "dir" / "x").write_bytes(b"x\n")
    with LayerfsMount(d, [d], log_path=tmp_path / "ro.log") as m:
        assert _run(m, "cat", str(d / "file")).stdout == b"hello\n"
        assert _run(m, "ls", str(d / "dir")).stdout == b"x\n"
        assert _run(m, "stat", "-c", "%s", str(d / "dir" / "x")).stdout == b"2\n"
    assert (d / "file").read_bytes() == b"hello\n"


@pytest.mark.mount
def test_mount_over_its_own_lower_with_an_upper(tmp_path, fuse):
    d, upper, work = tmp_path / "d", tmp_path / "upper", tmp_path / "work"
    for p in (d, upper, work):
        p.mkdir()
    (d / "file").write_bytes(b"hello\n")
    with LayerfsMount(d, [d], upper, work, log_path=tmp_path / "rw.log") as m:
        r = _run(m, "sh", "-c", f"echo new > {d}/new && echo more >> {d}/file && ls {d}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [b"file", b"new"]
        assert _run(m, "cat", str(d / "file")).stdout == b"hello\nmore\n"
    assert (upper / "new").read_bytes() == b"new\n"
    assert (upper / "file").read_bytes() == b"hello\nmore\n"
    assert (d / "file").read_bytes() == b"hello\n"  # the lower itself is untouched


# ----- commit of an upper holding such paths ----------------------------------------------
def _deep_upper(tmp_path: Path, depth: int) -> tuple[Path, Path, list[bytes]]:
    lower, upper = tmp_path / "lower", tmp_path / ("p" * 200) / "upper"
    lower.mkdir()
    upper.mkdir(parents=True)
    names = level_names(depth)
    with deep_dir(lower, names, create=True) as dfd:
        write_at(dfd, b"gone", b"old")
    with deep_dir(upper, names, create=True) as dfd:
        write_at(dfd, b"f", b"deep data")
        os.setxattr(b"/proc/self/fd/%d/f" % dfd, b"user.k", b"v")
        os.symlink(b"f", b"s", dir_fd=dfd)
        os.mknod(b"gone", stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=dfd)
    return lower, upper, names


def test_changeset_of_an_upper_whose_paths_pass_path_max(tmp_path):
    """Inside the layer the paths fit a tar (< 4,096 bytes); with the upper's own location
    they pass PATH_MAX, where plain path calls fail."""
    import io
    import tarfile

    from imagestore import changeset

    lower, upper, names = _deep_upper(tmp_path, 16)  # 16 × 251 bytes inside the layer
    deep = "/".join(os.fsdecode(n) for n in names)
    assert len(os.fsencode(upper)) + len(deep) + 3 > 4096
    got = changeset.changes(upper, [lower])
    assert f"/{deep}/f" in got.added and f"/{deep}/gone" in got.deleted
    out = io.BytesIO()
    changeset.write_changeset(upper, [lower], out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        members = {m.name: m for m in tar}
        f = members[f"{deep}/f"]
        assert tar.extractfile(f).read() == b"deep data"  # type: ignore[union-attr]
        assert f.pax_headers.get("SCHILY.xattr.user.k") == "v"
        assert members[f"{deep}/s"].linkname == "f"
        assert f"{deep}/.wh.gone" in members


def test_commit_of_a_deep_upper(tmp_path):
    from imagestore.commit import CommitOptions, commit
    from imagestore.pull import image_layers
    from tests import imagedata

    store, lowers = imagedata.pulled_sample(tmp_path / "img")
    upper = tmp_path / ("p" * 200) / "upper"
    upper.mkdir(parents=True)
    names = level_names(16)
    with deep_dir(upper, names, create=True) as dfd:
        write_at(dfd, b"f", b"deep data")
    commit(
        store, upper, lowers, "base", "deep", CommitOptions(verify=True)
    )  # the self-check reads it too
    with deep_dir(image_layers(store, "deep")[-1], names, create=False) as dfd:
        assert read_at(dfd, b"f") == b"deep data"


def test_changeset_refuses_a_path_no_layer_can_hold(tmp_path):
    import io

    from imagestore import changeset

    lower, upper, names = _deep_upper(tmp_path, DEPTH)  # 20 × 251 bytes: past tar's limit
    deep = "/".join(os.fsdecode(n) for n in names)
    assert f"/{deep}/f" in changeset.changes(upper, [lower]).added
    with pytest.raises(changeset.ChangesetError, match="longer than 4096 bytes"):
        changeset.write_changeset(upper, [lower], io.BytesIO())


@pytest.mark.mount
@pytest.mark.parametrize("transport", ["native", "pyfuse3"])
def test_freeze_of_a_mount_over_its_own_upper(tmp_path, fuse, transport):
    """Mounted on its upper dir (allowed, as by the kernel): the mount shadows the upper, so a
    freeze (what `layer diff`/`commit` ask) must sync the upper through the fd the daemon
    holds, on both transports — by path it would reach the mount itself."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for p in (lower, upper, work):
        p.mkdir()
    (lower / "file").write_bytes(b"hello\n")
    log = tmp_path / f"{transport}.log"
    with LayerfsMount(upper, [lower], upper, work, f"fuse={transport}", log_path=log) as m:
        r = _run(m, "sh", "-c", f"echo more >> {upper}/file")
        assert r.returncode == 0, r.stderr
        with control.frozen(work, timeout=20):
            pass
        assert _run(m, "cat", str(upper / "file")).stdout == b"hello\nmore\n"

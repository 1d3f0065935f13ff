"""Writer on plain directories: the write rules without FUSE, root or a mount.

Each test builds a lower and an empty upper/work under tmp_path, drives Writer the way the
handlers do (look up, then change), and checks the upper directory itself: the on-disk result
that kernel overlayfs, a remount and `layer commit` read.  The mount-level tests
(test_write_rules, the oracles) check the same rules through the kernel.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from unionfs import markers
from unionfs.errors import NotEmpty, NotFound, UnionError
from unionfs.stack import LayerStack
from unionfs.writer import Writer


@pytest.fixture
def rw(tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "file").write_bytes(b"lower data")
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_bytes(b"x")
    (lower / "empty").mkdir()

    def make() -> tuple[LayerStack, Writer]:
        stack = LayerStack([str(lower)], str(upper))
        return stack, Writer(stack, str(work))

    return tmp_path, make


def _whiteout_or_skip(path) -> None:
    st = os.lstat(path)
    assert markers.is_chardev_whiteout(st), stat.filemode(st.st_mode)


def _lookup(stack: LayerStack, *names: bytes):
    node = stack.root
    for n in names:
        node = stack.lookup(node, n)
    return node


def test_a_merged_directory_counts_its_subdirectories_through_changes(rw):
    """nlink of a merged directory is 2 + its merged subdirectories, counted once and then
    kept up to date as entries come and go (a GETATTR of the directory follows every unlink
    in it: recounting made rm -rf quadratic)."""
    tmp, make = rw
    stack, writer = make()
    root = stack.root
    assert stack.root.merged

    def nlink() -> int:
        return stack.nlink(root, stack.stat(root))

    assert nlink() == 4  # dir, empty
    writer.make(root, b"new", stat.S_IFDIR, 0o755, os.getuid(), os.getgid())
    assert nlink() == 5
    writer.rmdir(root, b"empty")
    assert nlink() == 4
    writer.unlink(root, b"file")
    assert nlink() == 4
    writer.make(root, b"file", stat.S_IFDIR, 0o755, os.getuid(), os.getgid())  # over a whiteout
    assert nlink() == 5
    writer.rename(root, b"new", _lookup(stack, b"dir"), b"moved", 0)  # out of the root
    assert nlink() == 4
    assert nlink() == 2 + sum(1 for e in stack.listing(root).values() if e.dirs is not None)


def test_whiteouts_share_one_inode_as_kernel_overlayfs_makes_them(rw):
    """Every whiteout is a link to one in the work dir (ovl_whiteout since Linux 5.8): a
    rename-over (`file` replaced then removed), a plain unlink and an rmdir."""
    tmp, make = rw
    stack, writer = make()
    writer.unlink(stack.root, b"file")
    writer.unlink(_lookup(stack, b"dir"), b"inner")
    writer.rmdir(stack.root, b"dir")
    writer.rmdir(stack.root, b"empty")
    upper = tmp / "upper"
    names = [upper / "file", upper / "dir", upper / "empty"]
    for p in names:
        _whiteout_or_skip(p)
    assert len({os.lstat(p).st_ino for p in names}) == 1
    assert os.lstat(upper / "file").st_nlink == len(names) + 1  # and the work dir's


@pytest.mark.parametrize("refusal", [errno.EMLINK, errno.EPERM])
def test_a_refused_link_still_makes_the_whiteout(rw, monkeypatch, refusal):
    """At the link limit the next whiteout starts a new shared one; a filesystem refusing
    links to it gets one inode per whiteout, as before sharing."""
    tmp, make = rw
    stack, writer = make()
    real_link, calls = writer.fs.link, []

    def link(src: bytes, dst: bytes) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(refusal, os.strerror(refusal))
        real_link(src, dst)

    monkeypatch.setattr(writer.fs, "link", link)
    writer.unlink(stack.root, b"file")
    writer.rmdir(stack.root, b"empty")
    upper = tmp / "upper"
    for p in (upper / "file", upper / "empty"):
        _whiteout_or_skip(p)
    inos = {os.lstat(upper / n).st_ino for n in ("file", "empty")}
    if refusal == errno.EMLINK:
        assert len(calls) == 3 and len(inos) == 1  # linked again, to the new shared one
    else:
        assert len(calls) == 1 and len(inos) == 2  # never tried again


def test_unlink_of_a_lower_file_leaves_a_whiteout(rw):
    tmp, make = rw
    stack, writer = make()
    writer.unlink(stack.root, b"file")
    _whiteout_or_skip(tmp / "upper" / "file")
    with pytest.raises(NotFound):
        _lookup(stack, b"file")
    assert (tmp / "lower" / "file").read_bytes() == b"lower data"  # lowers never change


def test_unlink_of_an_upper_only_file_leaves_nothing(rw):
    tmp, make = rw
    stack, writer = make()
    _, fd = writer.create(stack.root, b"new", 0o644, os.O_WRONLY, os.getuid(), os.getgid())
    os.close(fd)
    writer.unlink(stack.root, b"new")
    assert not os.path.lexists(tmp / "upper" / "new")  # nothing below: no needless whiteout


def test_rmdir_needs_a_logically_empty_directory(rw):
    tmp, make = rw
    stack, writer = make()
    with pytest.raises(NotEmpty):
        writer.rmdir(stack.root, b"dir")
    writer.unlink(_lookup(stack, b"dir"), b"inner")
    writer.rmdir(stack.root, b"dir")
    _whiteout_or_skip(tmp / "upper" / "dir")


def test_a_directory_made_over_a_whiteout_is_opaque(rw):
    tmp, make = rw
    stack, writer = make()
    writer.unlink(_lookup(stack, b"dir"), b"inner")
    writer.rmdir(stack.root, b"dir")
    writer.make(stack.root, b"dir", stat.S_IFDIR, 0o755, os.getuid(), os.getgid())
    assert markers.dir_marks(os.fsencode(tmp / "upper" / "dir")).opaque
    assert stack.listing(_lookup(stack, b"dir")) == {}  # the lower `inner` stays hidden


def test_copy_up_keeps_data_and_mode_and_leaves_the_lower_alone(rw):
    tmp, make = rw
    os.chmod(tmp / "lower" / "file", 0o640)
    stack, writer = make()
    node = _lookup(stack, b"file")
    ino = node.ino
    plan = writer.plan_copy_up(node)
    assert plan is not None
    Writer.copy_data(plan)
    writer.finish_copy_up(plan)
    up = tmp / "upper" / "file"
    assert up.read_bytes() == b"lower data" and stat.S_IMODE(os.stat(up).st_mode) == 0o640
    assert stack.in_upper(node) and node.ino == ino  # st_ino is stable across copy-up
    assert os.listdir(tmp / "work" / "layerfs") == []  # built there, then renamed into place


@pytest.mark.parametrize("nameless", [True, False])
def test_a_copy_up_in_progress_is_nameless_and_an_aborted_one_leaves_nothing(rw, nameless):
    """As the kernel's copy-up (ovl_copy_up_tmpfile), the copy is an O_TMPFILE file until it
    is linked into place: no name in the work dir while the data is copied, nothing at all
    once aborted (a daemon killed there leaves nothing either).  Where the filesystem or the
    daemon's privileges refuse that, the copy is a named file in the work dir, renamed."""
    tmp, make = rw
    work = tmp / "work" / "layerfs"
    stack, writer = make()
    if not nameless:
        writer._tmpfile = False  # as where O_TMPFILE or linkat(AT_EMPTY_PATH) is refused
    for names, finish in (((b"file",), False), ((b"dir", b"inner"), True)):
        node = _lookup(stack, *names)
        upper = tmp.joinpath("upper", *(n.decode() for n in names))
        plan = writer.plan_copy_up(node)
        assert plan is not None
        Writer.copy_data(plan)
        mid = os.listdir(work)
        assert (mid == []) if nameless else (len(mid) == 1), mid
        if finish:
            writer.finish_copy_up(plan)
            assert upper.read_bytes() == b"x" and stack.in_upper(node)
        else:
            writer.abort_copy_up(plan)
            assert not upper.exists() and not stack.in_upper(node)
        assert os.listdir(work) == [] and plan.fd == -1
    assert writer._tmpfile is nameless  # the probe found O_TMPFILE usable here


def test_renaming_a_lower_directory_records_a_redirect(rw):
    tmp, make = rw
    stack, writer = make()
    writer.rename(stack.root, b"dir", stack.root, b"moved", 0)
    marks = markers.dir_marks(os.fsencode(tmp / "upper" / "moved"))
    assert marks.redirect is not None and marks.redirect.rstrip(b"\0") in (b"dir", b"/dir")
    _whiteout_or_skip(tmp / "upper" / "dir")
    # a fresh model of the same upper finds the lower content through the redirect
    stack2 = LayerStack([str(tmp / "lower")], str(tmp / "upper"))
    assert list(stack2.listing(_lookup(stack2, b"moved"))) == [b"inner"]


def test_redirect_dir_off_refuses_to_move_a_lower_directory(tmp_path):
    lower, upper, work = tmp_path / "l", tmp_path / "u", tmp_path / "w"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "d").mkdir()
    stack = LayerStack([str(lower)], str(upper))
    writer = Writer(stack, str(work), create_redirects=False)
    with pytest.raises(UnionError) as exc:  # carries its errno
        writer.rename(stack.root, b"d", stack.root, b"e", 0)
    assert exc.value.errno == errno.EXDEV


def test_index_on_links_a_copy_at_a_name_shown_through_a_moved_directory(tmp_path):
    """index=on: copy-up links the new upper file at every other name of the lower file the
    merged view shows, also at one shown through a moved directory (its redirect) that no
    known node holds: here none, as after the kernel forgot them.  Without that the name went
    on showing the lower file beside its copy (a stress run: the kernel, reading the upper
    with index=on, showed the two names apart; the remount lost the name)."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (upper, work):
        d.mkdir(parents=True)
    (lower / "b/y/h3").mkdir(parents=True)
    (lower / "c").mkdir()
    (lower / "a").mkdir()
    (lower / "a/h").write_bytes(b"in\n")
    os.link(lower / "a/h", lower / "b/y/h3/in")
    stack = LayerStack([str(lower)], str(upper), index=True)
    writer = Writer(stack, str(work))
    writer.rename(_lookup(stack, b"b"), b"y", _lookup(stack, b"c"), b"f3", 0)
    assert markers.dir_marks(os.fsencode(upper / "c/f3")).redirect == b"/b/y"
    assert [n.ino for n in stack.known_nodes()] == [stack.root.ino]  # nothing remembered
    plan = writer.plan_copy_up(_lookup(stack, b"a", b"h"))
    assert plan is not None
    Writer.copy_data(plan)
    writer.finish_copy_up(plan)
    copy = os.lstat(upper / "a/h")
    assert os.lstat(upper / "c/f3/h3/in").st_ino == copy.st_ino and copy.st_nlink == 2
    assert not (work / "layerfs-index").exists()  # every name is shown: no index entry
    fresh = LayerStack([str(lower)], str(upper), index=True)
    assert fresh.in_upper(_lookup(fresh, b"c", b"f3", b"h3", b"in"))


def test_a_node_that_fails_half_made_in_place_is_removed(rw, monkeypatch):
    """mkdir, mknod and symlink make the object in place (so it inherits its directory's
    inode flags); when setting its owner then fails, it is removed again, and the error is
    the caller's: no object the daemon owns is left in the upper under the caller's name."""
    tmp, make = rw
    stack, writer = make()

    def refused(path, uid, gid):
        raise OSError(errno.ENOSPC, "no space left")

    monkeypatch.setattr(writer.fs, "chown", refused)
    for name, kind, target in ((b"d", stat.S_IFDIR, b""), (b"s", stat.S_IFLNK, b"file"),
                               (b"p", stat.S_IFIFO, b"")):  # fmt: skip
        with pytest.raises(OSError) as exc:
            writer.make(stack.root, name, kind, 0o755, 1000, 1000, target=target)
        assert exc.value.errno == errno.ENOSPC
        assert not os.path.lexists(tmp / "upper" / os.fsdecode(name))
    assert sorted(os.listdir(tmp / "upper")) == []

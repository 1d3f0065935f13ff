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

"""The kernel's writeback cache (`-o writeback=1`): what it asks of the daemon, on real mounts.

With it, write(2) only dirties the kernel's page cache; the kernel writes pages back later in
large WRITE requests, may READ through a handle opened O_WRONLY to fill a partly written page,
does O_APPEND itself, keeps i_size and mtime itself and sends them with SETATTR, and a live
commit must flush the mount before it freezes it.  Every mount here says `writeback=1`, so
these cases hold whatever the default is, and `fuse=native`: the pyfuse3 transport refuses
the writeback cache (options.WRITEBACK_DEFAULT).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from imagestore import mountrecords
from imagestore.commit import CommitOptions, commit
from imagestore.pull import image_layers
from imagestore.store import Store
from tests import imagedata
from tests.layerdata import write
from tests.mounts import LayerfsMount, require_root
from tests.test_pull import LAYER, layer
from unionfs import control
from unionfs.fsutil import syncfs

pytestmark = pytest.mark.mount

PAGE = 4096
WRITEBACK = "writeback=1,fuse=native"
FIXED_NS = 1_600_000_000_123_456_789


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    """One writeback mount for the small cases; each test works in its own subdirectory."""
    tmp = tmp_path_factory.mktemp("writeback")
    lower, upper, work, mnt = (tmp / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for case in ("wronly", "append", "attrs", "utime", "unlinked", "copyup"):
        write(lower / case / "data", bytes(range(256)) * 32)  # 8 KiB, never read yet
    for name in ("a", "b", "c"):
        write(lower / "gone" / name, b"lower " + name.encode())
    with LayerfsMount(mnt, [lower], upper, work, extra_opts=WRITEBACK):
        yield {"mnt": mnt, "upper": upper, "lower": lower}


def test_write_only_handle_then_read_back(wb):
    """A write into the middle of an uncached page makes the kernel READ that page through
    the O_WRONLY handle: the daemon must have opened the real file O_RDWR."""
    path = wb["mnt"] / "wronly/data"
    original = bytes(range(256)) * 32
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"XY", PAGE + 1) == 2
        assert os.pwrite(fd, b"Z", 3 * PAGE + 7) == 1  # past the end: a hole, then Z
    finally:
        os.close(fd)
    want = bytearray(original)
    want[PAGE + 1 : PAGE + 3] = b"XY"
    want += bytes(3 * PAGE + 7 - len(want)) + b"Z"
    with open(path, "rb") as f:
        assert f.read() == bytes(want)
    assert (wb["upper"] / "wronly/data").read_bytes() == bytes(want)
    assert (wb["lower"] / "wronly/data").read_bytes() == original  # the lower is untouched


def test_append_lands_at_the_end(wb):
    """The kernel does O_APPEND from its own i_size; two appending fds, interleaved, and a
    pwrite on an O_APPEND fd (which appends on Linux) all land at the end, in order."""
    path = wb["mnt"] / "append/data"
    original = (wb["lower"] / "append/data").read_bytes()
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        os.write(a, b"one\n")
        os.write(b, b"two\n")
        os.write(a, b"three" * 1000)
        os.pwrite(b, b"four\n", 0)
        assert os.fstat(a).st_size == len(original) + 4 + 4 + 5000 + 5
    finally:
        os.close(a)
        os.close(b)
    want = original + b"one\ntwo\n" + b"three" * 1000 + b"four\n"
    assert path.read_bytes() == want
    assert (wb["upper"] / "append/data").read_bytes() == want


def test_size_and_mtime_seen_by_stat(wb):
    """While pages are dirty the kernel owns i_size and mtime; stat through the mount sees
    them at once, and once written back the upper file says the same."""
    path = wb["mnt"] / "attrs/data"
    before = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 10000, 20000)
        st = os.stat(path)
        assert st.st_size == 30000 and os.fstat(fd).st_size == 30000
        assert st.st_mtime_ns >= before.st_mtime_ns
        os.ftruncate(fd, 25000)  # a truncate with dirty pages beyond it
        assert os.stat(path).st_size == 25000
        os.write(fd, b"head")  # offset 0
    finally:
        os.close(fd)
    seen = os.stat(path)
    real = os.stat(wb["upper"] / "attrs/data")
    assert seen.st_size == real.st_size == 25000
    assert seen.st_mtime_ns == real.st_mtime_ns
    data = path.read_bytes()
    assert data[:4] == b"head" and data[20000:] == b"x" * 5000


def test_explicit_mtime_survives_writeback(wb):
    """utime after writes whose pages are still dirty: writing them back must not leave the
    real file with the write-back time instead of the one asked for."""
    path = wb["mnt"] / "utime/data"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"dirty" * 1000)
        os.utime(path, ns=(FIXED_NS, FIXED_NS))
        os.fsync(fd)  # write the dirty pages back now, after the utime
    finally:
        os.close(fd)
    assert os.stat(path).st_mtime_ns == FIXED_NS
    assert os.stat(wb["upper"] / "utime/data").st_mtime_ns == FIXED_NS


def test_setattr_of_unlinked_open_file_never_touches_its_old_name(wb):
    """fchmod of an open file whose name is gone (the kernel sends it without a handle, as it
    does the mtime of an unlinked file it writes back) changes that file, not whatever has
    taken its name since."""
    d = wb["mnt"] / "unlinked"
    fd = os.open(d / "data", os.O_RDWR)
    try:
        os.write(fd, b"old file")
        os.unlink(d / "data")
        write(d / "data", b"new file")
        os.chmod(d / "data", 0o644)
        os.fchmod(fd, 0o600)
        os.write(fd, b" more")
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(d / "data").st_mode) == 0o644
    assert (d / "data").read_bytes() == b"new file"
    assert stat.S_IMODE(os.stat(wb["upper"] / "unlinked/data").st_mode) == 0o644


def test_names_going_away_leave_syncfs_clean(wb):
    """The kernel owns the ctime of regular files: unlink and rename send a SETATTR of times
    for files left without a name (a whited-out lower file, one open read-only, a deleted
    upper file, a replaced one).  They must succeed, or the next syncfs reports the error
    (and a live commit, which syncs the mount before freezing it, fails)."""
    d = wb["mnt"] / "gone"
    os.unlink(d / "a")
    fd = os.open(d / "b", os.O_RDONLY)
    try:
        os.unlink(d / "b")
        write(d / "new", b"upper file")
        os.unlink(d / "new")
        write(d / "x", b"replaces c")
        os.rename(d / "x", d / "c")
        syncfs(os.fsencode(wb["mnt"]))
        assert os.read(fd, 100) == b"lower b"
    finally:
        os.close(fd)
    syncfs(os.fsencode(wb["mnt"]))
    assert sorted(os.listdir(d)) == ["c"] and (d / "c").read_bytes() == b"replaces c"


def test_copy_up_happens_at_open_for_write(wb):
    """The copy-up is done by open(O_WRONLY), before any write reaches the daemon."""
    path = wb["mnt"] / "copyup/data"
    fd = os.open(path, os.O_WRONLY)
    try:
        assert (wb["upper"] / "copyup/data").read_bytes() == bytes(range(256)) * 32
        os.write(fd, b"changed")  # only in the page cache for now
    finally:
        os.close(fd)
    assert (wb["upper"] / "copyup/data").read_bytes()[:7] == b"changed"


def test_sigterm_keeps_data_not_yet_written_back(tmp_path, fuse):
    """libfuse's unmount closes /dev/fuse before the kernel could write dirty pages back; the
    daemon syncs its mount on SIGTERM first, so a completed write(2) is never lost."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    payload = os.urandom(100_000)
    with LayerfsMount(mnt, [lower], upper, work, extra_opts=WRITEBACK) as m:
        assert m.proc is not None
        fd = os.open(mnt / "unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(timeout=40) == 0
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # the daemon is gone: its flush cannot be answered
                assert exc.errno == errno.ENOTCONN
    assert (upper / "unsynced").read_bytes() == payload


@pytest.fixture
def image_mount(tmp_path, fuse):
    """A pulled image mounted with writeback=1, with the upper and work dirs a commit needs."""
    require_root()
    store, lowers = imagedata.pulled_sample(tmp_path)
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with LayerfsMount(mnt, list(reversed(lowers)), upper, work, extra_opts=WRITEBACK):
        yield {"store": store, "lowers": lowers, "upper": upper, "work": work, "mnt": mnt}


def test_live_commit_sees_data_written_but_not_fsynced(image_mount):
    """Data still dirty in the kernel's page cache of the mount (written, neither fsynced nor
    closed) is in the upper once the mount is frozen, so a live commit has it."""
    m = image_mount
    payload = os.urandom(3 * PAGE + 123)
    fd = os.open(m["mnt"] / "srv/unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        with control.frozen(m["work"]):
            assert (m["upper"] / "srv/unsynced").read_bytes() == payload
            commit(m["store"], m["upper"], m["lowers"], "base", "snap", CommitOptions(verify=True))
    finally:
        os.close(fd)
    layer_dir = image_layers(m["store"], "snap")[-1]
    assert (layer_dir / "srv/unsynced").read_bytes() == payload


APPENDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
i = 0
while True:
    os.write(fd, b"%04095d\\n" % i)  # one 4 KiB record per write(2)
    i += 1
"""


def test_layer_commit_verify_while_a_process_appends(tmp_path, fuse):
    """`layer commit --verify` of a live mount that a process keeps appending to finishes:
    nothing reads through the frozen mount (a close there would wait for the appender's
    dirty pages, which the frozen daemon does not take).  `layer mount` makes the record;
    the same upper is then served by our own writeback=1 daemon, which teardown can kill.
    The appender is a process of its own: while the mount is frozen, a process holding a
    dirty fd on it blocks when it closes it, and so when it forks and execs."""
    root = tmp_path / "store"
    imagedata.write_oci_layout(tmp_path / "layout")
    layer("pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "base", root=root)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer("mount", "base", str(mnt), "--name", "w", root=root)
    layer("umount", str(mnt), root=root)
    store = Store.open(root)
    rec = mountrecords.load(store, "w")
    assert rec is not None
    lowers = list(reversed(image_layers(store, "base")))
    with LayerfsMount(mnt, lowers, rec.upper, rec.work, extra_opts=WRITEBACK) as m:
        log = mnt / "srv/log"
        app = subprocess.Popen([sys.executable, "-c", APPENDER, str(log)])
        try:
            deadline = time.monotonic() + 30
            while not log.exists() or log.stat().st_size < 50 * PAGE:  # stat opens nothing
                assert app.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            cmd = [LAYER, "commit", "--root", str(root), "--verify", "--compress", "none"]
            proc = subprocess.Popen(
                [*cmd, "w", "snap:1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                assert m.proc is not None
                m.proc.kill()  # aborts the connection: releases the commit and the appender
                proc.kill()
                proc.communicate()
                pytest.fail("layer commit --verify hung on a frozen writeback mount")
            assert proc.returncode == 0, err
        finally:
            app.kill()
            app.wait(timeout=30)
    data = (image_layers(store, "snap:1")[-1] / "srv/log").read_bytes()
    assert len(data) % PAGE == 0 and len(data) >= 50 * PAGE
    assert data == (rec.upper / "srv/log").read_bytes()[: len(data)]

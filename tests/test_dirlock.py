"""The lock a writable mount holds on its upper and work dirs (unionfs/dirlock.py): refused
at once while the holder's mount is there, waited for while the holder is exiting."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

from unionfs import dirlock, mounttable
from unionfs.errors import UnionError


def _hold(path, record: str) -> int:
    """Take the lock on `path` the way another daemon would, with its record."""
    st = os.stat(path)
    locks = os.path.join(dirlock._runtime_dir(), f"layerfs-locks-{os.geteuid()}")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(locks, f"{st.st_dev}:{st.st_ino}"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode() + b"\n", 0)
    return fd


def test_a_holder_whose_mount_is_live_is_refused_at_once(tmp_path):
    held = _hold(tmp_path, f"1 {dirlock._mount_ns()} /")  # "/" is always a mount point
    try:
        t0 = time.monotonic()
        with pytest.raises(UnionError) as exc:
            dirlock.lock_dir(str(tmp_path), "workdir", str(tmp_path / "mnt"))
        assert exc.value.errno == errno.EBUSY and "in use by another mount" in str(exc.value)
        assert time.monotonic() - t0 < 1
    finally:
        os.close(held)


@pytest.mark.parametrize("record", ["1 {ns} ", "1 {ns}", "1 0 {gone}", ""])
def test_a_holder_that_cannot_be_checked_is_refused_at_once(tmp_path, record):
    """No mountpoint recorded (a holder not mounting, or not yet written), another mount
    namespace, or no record at all: EBUSY without waiting."""
    gone = tmp_path / "not-mounted"
    held = _hold(tmp_path, record.format(ns=dirlock._mount_ns(), gone=gone))
    try:
        with pytest.raises(UnionError, match="in use by another mount"):
            dirlock.lock_dir(str(tmp_path), "upperdir", str(tmp_path / "mnt"))
    finally:
        os.close(held)


def test_an_unmounted_holder_is_waited_for(tmp_path):
    gone = tmp_path / "not-mounted"
    held = _hold(tmp_path, f"1 {dirlock._mount_ns()} {gone}")
    threading.Timer(0.2, os.close, (held,)).start()  # the old daemon exits
    t0 = time.monotonic()
    fd = dirlock.lock_dir(str(tmp_path), "workdir", str(tmp_path / "mnt"))
    try:
        assert time.monotonic() - t0 >= 0.15
        record = os.pread(fd, 4096, 0).decode().split(" ", 2)
        assert record[0] == str(os.getpid()) and record[2] == f"{tmp_path / 'mnt'}\n"
    finally:
        os.close(fd)


def test_an_unmounted_holder_that_never_exits_is_refused_in_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(dirlock, "RELEASE_WAIT", 0.2)
    held = _hold(tmp_path, f"1 {dirlock._mount_ns()} {tmp_path / 'not-mounted'}")
    try:
        with pytest.raises(UnionError, match="did not exit") as exc:
            dirlock.lock_dir(str(tmp_path), "workdir", str(tmp_path / "mnt"))
        assert exc.value.errno == errno.EBUSY
    finally:
        os.close(held)


def test_mountinfo_escapes_are_undone():
    """What the holder check reads mountpoints with (unionfs/mounttable.py)."""
    assert mounttable.unescape(b"/a\\040b\\134c") == b"/a b\\c"
    assert mounttable.unescape(b"/plain") == b"/plain"

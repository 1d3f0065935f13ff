"""Focused read-side rules on a real mount: permissions, statfs, access, readdir details."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from tests.layerdata import write
from tests.mounts import LayerfsMount, is_mounted, need, open_path_to

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def mnt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    lo, hi, mnt = root / "lo", root / "hi", root / "mnt"
    write(lo / "public", b"anyone", mode=0o644)
    write(lo / "private", b"root only", mode=0o600)
    write(lo / "d/a", b"a")
    write(hi / "d/b", b"b")
    write(lo / "big", os.urandom(5 << 20))
    mnt.mkdir()
    with LayerfsMount(mnt, [hi, lo]):
        yield mnt


def test_mount_options_as_root(mnt):
    need(os.geteuid() == 0, "root mounts with allow_other")
    line = next(x for x in open("/proc/self/mountinfo") if x.split()[4] == str(mnt))
    opts = line.split(" - ")[1].split()[2].split(",")
    assert "allow_other" in opts and "default_permissions" in opts and "ro" in opts


def test_other_users_get_normal_permission_checks(mnt):
    need(os.geteuid() == 0, "switching users needs root")
    open_path_to(mnt.parent)  # let nobody reach the mountpoint

    def as_nobody(path):
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
            capture_output=True,
            timeout=30,
        )

    ok = as_nobody(mnt / "public")
    assert ok.returncode == 0 and ok.stdout == b"anyone", ok.stderr
    denied = as_nobody(mnt / "private")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_access_and_statfs(mnt):
    assert os.access(mnt / "public", os.R_OK)
    assert not os.access(mnt / "public", os.W_OK)  # read-only mount
    sv = os.statvfs(mnt)
    assert sv.f_blocks > 0 and sv.f_namemax >= 255


def test_large_reads_at_offsets(mnt):
    data = (mnt.parent / "lo" / "big").read_bytes()
    with open(mnt / "big", "rb") as f:
        assert f.read() == data
        f.seek(3 << 20)
        assert f.read(1 << 20) == data[3 << 20 : 4 << 20]
        f.seek(len(data) - 10)
        assert f.read(100) == data[-10:]


def test_merged_readdir_dot_entries_and_dedup(mnt):
    out = subprocess.run(
        ["ls", "-a", str(mnt / "d")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [".", "..", "a", "b"]
    with os.scandir(mnt) as it:
        names = [e.name for e in it]
    assert len(names) == len(set(names))


def test_errors_are_errnos(mnt):
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "public")
    with pytest.raises(OSError) as exc:
        os.readlink(mnt / "public")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt / "public", "user.nothing")
    assert exc.value.errno == errno.ENODATA


def test_fixture_survives_a_hung_daemon(tmp_path, fuse):
    """The teardown path itself: a stopped (hung) daemon is unmounted and killed in bounded
    time, without the test touching the hung mountpoint."""
    lo, mnt = tmp_path / "lo", tmp_path / "mnt"
    write(lo / "f", b"x")
    mnt.mkdir()
    m = LayerfsMount(mnt, [lo])
    m.start()
    assert m.proc is not None
    proc = m.proc
    proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 60
    assert proc.poll() is not None
    assert not is_mounted(mnt)


def test_fixture_reports_a_daemon_that_fails(tmp_path, fuse):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = LayerfsMount(mnt, [tmp_path / "does-not-exist"])
    with pytest.raises(RuntimeError, match="does-not-exist"):
        m.start()
    assert not is_mounted(mnt)

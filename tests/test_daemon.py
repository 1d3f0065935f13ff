"""The daemon's lifecycle with real mounts: daemonize, signals, fusermount, mount(8), -d, EROFS."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.layerdata import whiteout, write
from tests.mounts import (
    IN_CI,
    LAYERFS,
    LayerfsMount,
    fstype,
    is_mounted,
    lazy_unmount,
    need,
    overlay_options,
    require_fuse,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def stack(tmp_path, fuse):
    lo, hi, mnt = tmp_path / "lo", tmp_path / "hi", tmp_path / "mnt"
    for d in (lo, hi, mnt):
        d.mkdir()
    write(lo / "hidden", b"below")
    write(lo / "file", b"lower data")
    write(lo / "dir/inner", b"i")
    whiteout(hi / "hidden")
    write(hi / "top", b"upper data")
    yield lo, hi, mnt
    if is_mounted(mnt):
        lazy_unmount(str(mnt))


def _wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return  # exited; only not yet reaped by its (re)parent
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running")


def _daemon_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"layerfs .*{mnt}$"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, "daemon not found"
    return pids[0]


def test_daemonizes_and_returns_only_when_live(stack):
    lo, hi, mnt = stack
    r = subprocess.run(
        [LAYERFS, "-o", overlay_options([hi, lo]), str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    try:
        assert fstype(mnt) == "fuse.layerfs"  # live the moment the parent returns
        assert sorted(os.listdir(mnt)) == ["dir", "file", "top"]
        assert (mnt / "file").read_bytes() == b"lower data"
        pid = _daemon_pid(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
    _wait_gone(pid)  # fusermount3 -u also ends the daemon
    assert not is_mounted(mnt)


def test_the_daemon_lets_go_of_the_callers_output_before_the_parent_returns(tmp_path, fuse):
    """A caller that reads the mount program's output waits for the end of that pipe, not
    only for the process (podman keeps its stderr; `subprocess.run` with capture_output).
    The daemon inherits it, so it points its stdout and stderr at /dev/null before it tells
    the parent "OK"; it held them ~15 ms longer, until logging was set up (M1 63 → 49 ms
    with the output captured; a mount that logs before it is live has imported logging by
    then, so this one logs nothing)."""
    lo, up, work, mnt = (tmp_path / name for name in ("lo", "up", "work", "mnt"))
    for d in (lo, up, work, mnt):
        d.mkdir()
    proc = subprocess.Popen(
        [LAYERFS, "-o", overlay_options([lo], up, work), str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # a blocking wait (pytest's timeout bounds it): wait(timeout) polls, late by ms
        assert proc.wait() == 0
        held = []
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            try:
                assert os.read(pipe.fileno(), 4096) == b""  # the end: no writer is left
            except BlockingIOError:  # open, and empty: the daemon still holds it
                held.append(pipe.fileno())
        assert held == []
        assert fstype(mnt) == "fuse.layerfs"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_0(stack, sig):
    lo, hi, mnt = stack
    with LayerfsMount(mnt, [hi, lo]) as m:
        assert m.proc is not None
        fd = os.open(mnt / "file", os.O_RDONLY)  # an open file does not block a clean exit
        try:
            assert os.read(fd, 100) == b"lower data"
            m.proc.send_signal(sig)
            assert m.proc.wait(timeout=20) == 0
            assert not is_mounted(mnt)
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # the daemon is gone: its flush cannot be answered
                assert exc.errno == errno.ENOTCONN


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_right_after_the_mount_unmounts_too(stack, sig):
    """The daemon mounts first and loads trio and its handlers after; a signal in between
    (here: the moment the mount is live) must still unmount and exit 0, not kill the daemon
    and leave a dead mount ("Transport endpoint is not connected")."""
    lo, hi, mnt = stack
    for _ in range(3):
        m = LayerfsMount(mnt, [hi, lo])
        m.start()  # returns as soon as the mount is in the mount table
        try:
            assert m.proc is not None
            m.proc.send_signal(sig)
            assert m.proc.wait(timeout=20) == 0
            assert not is_mounted(mnt)
            assert os.listdir(mnt) == []  # the plain directory again
        finally:
            m.stop()


def _ignore_sigchld() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


@pytest.mark.parametrize("sigchld", ["default", "ignored"])
def test_mount_failure_is_reported_by_the_parent(stack, sigchld):
    """The waiting parent reports the daemon's failure.  Also where SIGCHLD is ignored (a
    parent passes that on through exec): the kernel then reaps the daemon's child itself,
    and waitpid fails with ECHILD."""
    lo, _hi, mnt = stack
    r = subprocess.run(
        [LAYERFS, "-o", f"lowerdir={lo},max_read=notanumber", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_ignore_sigchld if sigchld == "ignored" else None,
    )
    assert r.returncode == 1
    assert "layerfs: mounting" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not is_mounted(mnt)


def test_control_socket_in_a_deep_work_dir(stack, tmp_path):
    """The control socket's path may be longer than an AF_UNIX address holds (107 bytes):
    the daemon still mounts and a freezer still reaches it."""
    from unionfs import control

    lo, hi, mnt = stack
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    upper, work = deep / "upper", deep / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    assert len(os.fsencode(control.socket_path(work))) > 107
    with LayerfsMount(mnt, [hi, lo], upper, work):
        write(mnt / "new", b"through the mount")
        with control.frozen(work, timeout=20):
            assert (upper / "new").read_bytes() == b"through the mount"


def test_read_only_without_upper(stack):
    lo, hi, mnt = stack
    with LayerfsMount(mnt, [hi, lo]):
        attempts = [
            lambda: open(mnt / "file", "r+b"),
            lambda: open(mnt / "new", "wb"),
            lambda: os.mkdir(mnt / "d2"),
            lambda: os.unlink(mnt / "file"),
            lambda: os.rmdir(mnt / "dir"),
            lambda: os.rename(mnt / "file", mnt / "f2"),
            lambda: os.chmod(mnt / "file", 0o600),
            lambda: os.symlink("x", mnt / "l"),
            lambda: os.link(mnt / "file", mnt / "l2"),
            lambda: os.truncate(mnt / "file", 0),
            lambda: os.setxattr(mnt / "file", "user.x", b"1"),
            lambda: os.utime(mnt / "file", (1, 1)),
            lambda: os.mkfifo(mnt / "fifo"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        assert (mnt / "file").read_bytes() == b"lower data"
    assert sorted(os.listdir(lo)) == ["dir", "file", "hidden"]


def test_debug_logs_every_request(stack):
    lo, hi, mnt = stack
    log = stack[2].parent / "debug.log"
    proc = subprocess.Popen(
        [LAYERFS, "-d", "-o", overlay_options([hi, lo]), str(mnt)],
        stderr=open(log, "wb"),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        os.stat(mnt / "file")
        os.listdir(mnt / "dir")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        proc.wait(timeout=20)
    text = log.read_text()
    assert "lookup(1, b'file'" in text and "opendir(" in text


def test_mount_t_fuse_layerfs(stack):
    """mount(8) runs `layerfs SOURCE MNT -o rw,...,dev,suid` without PATH: the install puts
    layerfs in /usr/local/bin with the venv's interpreter in its shebang."""
    lo, hi, mnt = stack
    need(os.geteuid() == 0, "mount(8) of a FUSE type needs root here")
    helper = shutil.which("layerfs", path="/usr/local/bin:/usr/bin:/bin")
    need(helper is not None, "layerfs is not in /usr/local/bin (scripts/setup.sh links it)")
    assert helper is not None
    shebang = Path(helper).read_text().splitlines()[0]
    assert shebang.startswith("#!/") and not shebang.startswith("#!/usr/bin/env")
    r = subprocess.run(
        ["mount", "-t", "fuse.layerfs", "mysource", str(mnt), "-o", overlay_options([hi, lo])],
        capture_output=True,
        text=True,
        timeout=30,
        env={"LANG": "C"},
    )
    assert r.returncode == 0, r.stderr
    try:
        assert fstype(mnt) == "fuse.layerfs"
        assert (mnt / "top").read_bytes() == b"upper data"
        assert not (mnt / "hidden").exists()
    finally:
        subprocess.run(["umount", str(mnt)], timeout=30)
    assert not is_mounted(mnt)


def test_remount_ro_and_rw(stack, tmp_path):
    """`mount -o remount,ro MNT` (mount(8) runs the helper with `-o remount,...`) makes the
    live mount refuse changes (EROFS) and `remount,rw` takes them again, its other flags
    kept; no second daemon starts.  It was refused ("unknown option 'remount'";
    xfstests generic/294, 306, 452)."""
    lo, hi, mnt = stack
    need(os.geteuid() == 0, "remounting needs root")
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    subprocess.run([LAYERFS, "-o", overlay_options([hi, lo], up, wk) + ",nosuid", str(mnt)],
                   check=True, timeout=60)  # fmt: skip
    try:
        pid = _daemon_pid(mnt)
        for flag in ("ro", "rw"):
            r = subprocess.run([LAYERFS, "layerfs", str(mnt), "-o", f"rw,ro,nosuid,remount,{flag}"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            assert r.returncode == 0, r.stderr
            options = _mount_options(mnt)
            assert flag in options and "nosuid" in options, options
            if flag == "ro":
                with pytest.raises(OSError) as exc:
                    (mnt / "new").write_bytes(b"x")
                assert exc.value.errno == errno.EROFS
                assert (mnt / "top").read_bytes() == b"upper data"
        (mnt / "new").write_bytes(b"x")
        assert (up / "new").read_bytes() == b"x"
        assert _daemon_pid(mnt) == pid
        r = subprocess.run([LAYERFS, "-o", "remount,ro", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert (
            r.returncode != 0 and "not a layerfs mount" in r.stderr and "Traceback" not in r.stderr
        )
    finally:
        subprocess.run(["umount", str(mnt)], timeout=30)


def _mount_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return fields[5].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def test_find_loop_does_not_grow_memory(stack):
    """Lookup counts and forget are exact: after the kernel drops its caches, repeated
    `find` runs leave the daemon's memory where it was."""
    need(os.geteuid() == 0, "dropping the kernel's caches needs root")
    lo, hi, mnt = stack
    for i in range(2000):
        write(lo / "bulk" / f"d{i % 20}" / f"f{i}", b"")
    with LayerfsMount(mnt, [hi, lo]) as m:
        assert m.proc is not None

        def rss() -> int:
            with open(f"/proc/{m.proc.pid}/status") as f:
                return next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))

        samples = []
        for _ in range(6):
            subprocess.run(["find", str(mnt)], capture_output=True, check=True, timeout=120)
            Path("/proc/sys/vm/drop_caches").write_text("2")
            samples.append(rss())
        # warm-up may allocate; afterwards it must stay flat (allow 2 MiB of noise)
        assert max(samples[2:]) - samples[2] < 2048, samples


def test_ci_cannot_skip_fuse():
    """Under CI=true the FUSE tests must run; this guards the guard."""
    if IN_CI:
        require_fuse()  # fails, never skips, when FUSE is missing
        assert os.path.exists("/dev/fuse") and shutil.which("fusermount3")

"""Real mounts through the native FUSE transport (`-o fuse=native`): the mount itself
(mount(2) as root, fusermount3 for auto_unmount and for a user that is not root), the
caching features, measured by the requests the daemon saw, and a clean SIGTERM."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.mounts import LAYERFS, LayerfsMount, fstype, is_mounted, need, require_fuse

pytestmark = pytest.mark.mount


def counts(log: str) -> dict[str, int]:
    """The per-opcode request counts the daemon logs at exit under -o debug."""
    found = re.findall(r"requests: (.*)", log)
    assert found, log[-2000:]
    return {k: int(v) for k, v in (p.split("=") for p in found[-1].split(", "))}


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    lo = tmp_path / "lo"
    (lo / "dir").mkdir(parents=True)
    for i in range(20):
        (lo / "dir" / f"f{i}").write_bytes(b"%d" % i * 100)
    (lo / "big").write_bytes(os.urandom(3 << 20))
    os.symlink("big", lo / "link")
    return lo


def native(mnt: Path, lowers, upper=None, work=None, extra: str = "") -> LayerfsMount:
    opts = "fuse=native,debug" + (f",{extra}" if extra else "")
    return LayerfsMount(mnt, lowers, upper, work, extra_opts=opts)


def read_all(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "dir").iterdir())}


def test_read_only_stack_no_open_and_cached_listings(tmp_path, lower, fuse):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = native(mnt, [lower])
    with m:
        assert fstype(mnt) == "fuse.layerfs"
        first = read_all(mnt)
        assert first == read_all(lower)
        assert read_all(mnt) == first  # warm: served by the kernel's caches
        assert (mnt / "big").read_bytes() == (lower / "big").read_bytes()
        assert os.readlink(mnt / "link") == "big" and os.readlink(mnt / "link") == "big"
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")
    c = counts(m.log())
    assert c.get("OPEN", 0) <= 1 and c.get("OPENDIR", 0) <= 1  # ENOSYS once, then never
    assert c.get("READDIRPLUS", 0) <= 4  # root and dir, listed once each (+ EOF reads)
    assert c.get("READLINK", 0) == 1  # CACHE_SYMLINKS
    # 20 small files once (the second pass is served from the page cache: no READ), and
    # the big file in readahead-sized requests (128 KiB or more)
    assert c.get("READ", 0) <= 20 + (3 << 20) // (128 << 10) + 4
    assert c.get("FLUSH", 0) <= 1  # no-open handles have no NOFLUSH: one ENOSYS ends them


def test_read_write_stack(tmp_path, lower, fuse):
    mnt, up, wk = (tmp_path / n for n in ("mnt", "up", "wk"))
    for d in (mnt, up, wk):
        d.mkdir()
    m = native(mnt, [lower], up, wk)
    with m:
        data = os.urandom((2 << 20) + 123)
        with open(mnt / "new", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        assert (mnt / "new").read_bytes() == data
        with open(mnt / "dir" / "f1", "ab") as f:  # copy-up by append
            f.write(b"+")
        os.rename(mnt / "dir" / "f2", mnt / "dir" / "g2")
        os.unlink(mnt / "dir" / "f3")
        (mnt / "sub").mkdir(mode=0o750)
        os.setxattr(mnt / "sub", "user.k", b"v")
        os.chmod(mnt / "new", 0o600)
        os.truncate(mnt / "new", 10)
        names = sorted(os.listdir(mnt / "dir"))
        assert "g2" in names and "f2" not in names and "f3" not in names
        assert os.getxattr(mnt / "sub", "user.k") == b"v"
        assert os.stat(mnt / "new").st_size == 10
    assert (up / "new").read_bytes() == data[:10]
    assert (up / "dir" / "f1").read_bytes() == b"1" * 100 + b"+"
    assert (lower / "dir" / "f1").read_bytes() == b"1" * 100  # the lower is untouched
    assert os.stat(up / "sub").st_mode & 0o777 == 0o750 & ~os.umask(os.umask(0))
    c = counts(m.log())
    # the writeback cache makes the kernel flush on close despite FOPEN_NOFLUSH; the first
    # FLUSH is answered ENOSYS and ends them
    assert c.get("FLUSH", 0) <= 1


def test_lower_directory_listing_is_cached_until_changed(tmp_path, lower, fuse):
    mnt, up, wk = (tmp_path / n for n in ("mnt", "up", "wk"))
    for d in (mnt, up, wk):
        d.mkdir()
    m = native(mnt, [lower], up, wk)
    with m:
        for _ in range(3):
            assert len(os.listdir(mnt / "dir")) == 20
        before = m.log().count("READDIRPLUS #")
        (mnt / "dir" / "added").write_bytes(b"x")  # the kernel drops its cached listing
        assert "added" in os.listdir(mnt / "dir")
        os.unlink(mnt / "dir" / "f0")
        assert "f0" not in os.listdir(mnt / "dir")
    log = m.log()
    assert before <= 2, log[-3000:]  # one listing (and its EOF read) for three opendirs


def test_sigterm_unmounts_and_auto_unmount_through_fusermount(tmp_path, lower, fuse):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = native(mnt, [lower], extra="auto_unmount")
    with m:
        assert (mnt / "dir" / "f5").read_bytes() == b"5" * 100
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    m = native(mnt, [lower], extra="auto_unmount")
    with m:
        m.proc.kill()  # fusermount3 unmounts once the daemon's end of the socket closes
        deadline = time.monotonic() + 10
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mnt)


def test_daemonized_mount_and_its_failure(tmp_path, lower, fuse):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, LAYERFS_FUSE="native")
    r = subprocess.run(
        [LAYERFS, "-o", f"lowerdir={lower}", str(mnt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert fstype(mnt) == "fuse.layerfs"
        assert (mnt / "dir" / "f7").read_bytes() == b"7" * 100
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
    assert not is_mounted(mnt)
    # the kernel refuses the mount data: the parent exits non-zero with the daemon's reason
    r = subprocess.run(
        [LAYERFS, "-o", f"lowerdir={lower},max_read=notanumber", str(mnt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "mounting" in r.stderr and "Invalid argument" in r.stderr
    assert not is_mounted(mnt)


def test_rootless_mount_through_fusermount(fuse):
    need(os.geteuid() == 0, "needs root to switch to an unprivileged user")
    need(shutil.which("setpriv") is not None, "setpriv is missing")
    require_fuse()
    need(os.stat("/dev/fuse").st_mode & 0o006 == 0o006, "/dev/fuse is not open to users here")
    base = Path(tempfile.mkdtemp(prefix="nat-rootless-", dir="/tmp"))
    try:
        lo, mnt = base / "lo", base / "mnt"
        lo.mkdir()
        mnt.mkdir()
        (lo / "f").write_bytes(b"rootless")
        for p in (base, lo, mnt, lo / "f"):
            os.chown(p, 65534, 65534)
        cmd = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            LAYERFS,
            "-o",
            f"lowerdir={lo},fuse=native",
            str(mnt),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        try:
            assert fstype(mnt) == "fuse.layerfs"
            out = subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "cat",
                    str(mnt / "f"),
                ],
                capture_output=True,
                timeout=30,
            )
            assert out.stdout == b"rootless"
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        assert not is_mounted(mnt)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_unmounted_daemon_leaves_the_next_mount_alone(tmp_path, lower, fuse):
    """Unmounted from outside, a daemon must not unmount the mountpoint on its way out: a new
    mount may already sit there (libfuse checks the same: POLLERR on its device fd)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = native(mnt, [lower])
    first.start()
    second = native(mnt, [lower], extra="fsname=second")
    try:
        proc = first.proc
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        second.start()  # while the first daemon may still be shutting down
        assert proc.wait(timeout=20) == 0
        time.sleep(0.2)
        assert is_mounted(mnt) and (mnt / "dir" / "f3").read_bytes() == b"3" * 100
    finally:
        second.stop()
        first.stop()


def _copy_in_progress(pid: int, work: Path) -> bool:
    """The daemon holds a file in the work dir open, with data in it: a copy-up's file,
    nameless (O_TMPFILE: "/work/dir/#123 (deleted)") or named, made when the copy starts
    and linked or renamed into the upper when it ends."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd).startswith(f"{work}/"):
                st = (fds / fd).stat()
                if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                    return True
        except FileNotFoundError:  # closed between listing and reading
            continue
    return False


def test_a_big_copy_up_does_not_stall_other_requests(tmp_path, fuse):
    """While one process copies a big file up (open for append), another's requests are
    answered: a GETXATTR (never cached by the kernel, so it always reaches the daemon) is
    answered while the copy-up's file is still open in the work dir.  Ordering, not timing: a
    copy made on the session's own thread would answer nothing until it is in place."""
    import threading

    lo, mnt, up, wk = (tmp_path / n for n in ("lo", "mnt", "up", "wk"))
    for d in (lo, mnt, up, wk):
        d.mkdir()
    block = os.urandom(1 << 20)
    with open(lo / "big", "wb") as f:
        for _ in range(384):
            f.write(block)
    (lo / "other").write_bytes(b"x")
    os.setxattr(lo / "other", "user.k", b"v")
    with native(mnt, [lo], up, wk) as m:
        assert os.getxattr(mnt / "other", "user.k") == b"v"
        assert m.proc is not None
        pid = m.proc.pid
        done = threading.Event()

        def append() -> None:
            try:
                with open(mnt / "big", "ab") as f:
                    f.write(b"+")
            finally:
                done.set()

        opener = threading.Thread(target=append)
        opener.start()
        answered_during_copy = 0
        while not done.is_set():
            if not _copy_in_progress(pid, wk):
                continue
            assert os.getxattr(mnt / "other", "user.k") == b"v"
            if _copy_in_progress(pid, wk):
                answered_during_copy += 1
        opener.join()
        assert (mnt / "big").stat().st_size == 384 * (1 << 20) + 1
    assert answered_during_copy > 0


def test_small_lower_files_are_stored_at_open(tmp_path, fuse):
    """An open for reading of a lower file up to 128 KiB puts its data in the kernel's page
    cache (FUSE_NOTIFY_STORE) before the OPEN reply: reads then send no READ, so the kernel
    keeps the file's atime and a stat after the read sends no GETATTR.  Bigger files, and
    opens for writing, keep READ.  The data is the file's, byte for byte, at any size and
    offset, and stays right across a copy-up and a write."""
    lo, mnt, up, wk = (tmp_path / n for n in ("lo", "mnt", "up", "wk"))
    for d in (lo, mnt, up, wk):
        d.mkdir()
    sizes = {"empty": 0, "one": 1, "partial": 5000, "pages": 16384, "limit": 128 << 10}
    data = {name: os.urandom(size) for name, size in sizes.items()}
    data["over"] = os.urandom((128 << 10) + 1)
    data["direct"] = os.urandom(8192)
    for name, body in data.items():
        (lo / name).write_bytes(body)
    m = native(mnt, [lo], up, wk)
    with m:
        for name in sizes:
            assert (mnt / name).read_bytes() == data[name]
        log = m.log()
        before, stats = log.count("READ #"), log.count("GETATTR #")
        for name in sizes:
            with open(mnt / name, "rb") as f:
                f.seek(4093)
                assert f.read(7) == data[name][4093:4100]  # across a page boundary
                assert f.read() == data[name][4100:]
            os.stat(mnt / name)
        log = m.log()
        assert log.count("READ #") == before == 0, log[-3000:]
        assert log.count("GETATTR #") == stats, log[-3000:]  # no READ: the atime stays cached
        assert (mnt / "over").read_bytes() == data["over"]
        assert m.log().count("READ #") >= 1  # over the limit: READ, as before
        # Only while no OPEN of the inode was answered (a page locked by a READ in flight
        # would deadlock the store): an O_DIRECT open first, then a plain one, reads by READ
        reads = m.log().count("READ #")
        fd = os.open(mnt / "direct", os.O_RDONLY | os.O_DIRECT)
        try:
            assert (mnt / "direct").read_bytes() == data["direct"]
        finally:
            os.close(fd)
        assert m.log().count("READ #") > reads
        with open(mnt / "partial", "ab") as f:  # copy-up of a stored file, then a write
            f.write(b"+")
        assert (mnt / "partial").read_bytes() == data["partial"] + b"+"
        with open(mnt / "pages", "r+b") as f:
            f.seek(100)
            f.write(b"middle")
        want = data["pages"][:100] + b"middle" + data["pages"][106:]
        assert (mnt / "pages").read_bytes() == want
    assert (up / "partial").read_bytes() == data["partial"] + b"+"
    assert (up / "pages").read_bytes() == want
    assert (lo / "pages").read_bytes() == data["pages"]


def _real_fds_into(pid: int, d: Path) -> int:
    """How many of process `pid`'s fds are open on files under `d`."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(d) + "/")
        except OSError:
            pass
    return n


def _direct_read(fd: int, size: int) -> bytes:
    """pread through an O_DIRECT fd (an aligned buffer), so the kernel sends READ."""
    buf = mmap.mmap(-1, size)
    n = os.preadv(fd, [buf], 0)
    return bytes(buf[:n])


def test_read_only_lower_opens_open_the_real_file_at_first_need(tmp_path, fuse):
    """A read-only open of a lower file opens no real file in the daemon: the kernel serves
    its reads from the page cache, so the real fd is opened only when a READ comes.  What
    an fd opened that way reads is what it would have read from an fd opened at once:
    the lower file after its name was removed or renamed over, the upper copy after another
    fd's write copied it up."""
    lo, mnt, up, wk = (tmp_path / n for n in ("lo", "mnt", "up", "wk"))
    for d in (lo, mnt, up, wk):
        d.mkdir()
    data = {name: os.urandom(8192) for name in ("kept", "gone", "over", "copied")}
    for name, body in data.items():
        (lo / name).write_bytes(body)
    m = native(mnt, [lo], up, wk)
    with m:
        assert m.proc is not None
        for name in data:  # the first open stores the data (and opens the real file)
            assert (mnt / name).read_bytes() == data[name]
        held = [os.open(mnt / "kept", os.O_RDONLY) for _ in range(20)]
        try:
            assert all(os.pread(fd, 100, 0) == data["kept"][:100] for fd in held)  # cached
            assert _real_fds_into(m.proc.pid, lo) == 0
        finally:
            for fd in held:
                os.close(fd)
        fds = {name: os.open(mnt / name, os.O_RDONLY | os.O_DIRECT) for name in data}
        try:
            assert _real_fds_into(m.proc.pid, lo) == 0
            os.unlink(mnt / "gone")
            (mnt / "new").write_bytes(b"renamed over")
            os.rename(mnt / "new", mnt / "over")
            with open(mnt / "copied", "r+b") as f:
                f.write(b"UPPER")
            assert _direct_read(fds["kept"], 8192) == data["kept"]
            assert _real_fds_into(m.proc.pid, lo) == 1  # opened by its READ
            assert _direct_read(fds["gone"], 8192) == data["gone"]
            assert _direct_read(fds["over"], 8192) == data["over"]
            assert _direct_read(fds["copied"], 8192) == b"UPPER" + data["copied"][5:]
            assert os.fstat(fds["gone"]).st_size == 8192
        finally:
            for fd in fds.values():
                os.close(fd)
        assert (mnt / "over").read_bytes() == b"renamed over"
        assert not (mnt / "gone").exists()


def test_passthrough_of_big_lower_files(tmp_path, lower, fuse):
    """As root on a kernel with FUSE_PASSTHROUGH: a big lower file opened for reading is read
    by the kernel itself (no READ request); so is a file CREATE made for writing only
    written (no WRITE), while writes to other files, and to files created for appending or
    for reading and writing, stay requests (the freeze gate sees them); a big lower file
    read through passthrough cannot be opened for writing while that reader is open
    (ETXTBSY, see unionfs/fuse/passthrough.py), and can once it is closed."""
    need(os.geteuid() == 0, "passthrough needs CAP_SYS_ADMIN")
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    need(release >= (6, 9), "FUSE passthrough needs Linux 6.9")
    mnt, up, wk = (tmp_path / n for n in ("mnt", "up", "wk"))
    for d in (mnt, up, wk):
        d.mkdir()
    big = (lower / "big").read_bytes()
    m = native(mnt, [lower], up, wk)
    with m:
        assert (mnt / "big").read_bytes() == big
        with open(mnt / "big", "rb") as reader:
            with pytest.raises(OSError) as exc:
                open(mnt / "big", "ab")
            assert exc.value.errno == errno.ETXTBSY
            assert reader.read(10) == big[:10]
        with open(mnt / "big", "ab") as f:  # the reader is gone: copy-up, then a WRITE
            f.write(b"+")
        data = os.urandom(3 << 20)
        with open(mnt / "new", "wb") as w:  # created for writing only: passes through
            w.write(data)
            w.flush()
            with open(mnt / "new", "rb") as r:  # joins it on the upper file: no READ
                assert r.read() == data
        with open(mnt / "log", "ab") as f:  # created for appending: a WRITE
            f.write(b"log")
        with open(mnt / "db", "w+b") as f:  # created for reading and writing: a WRITE
            f.write(b"db")
    log = Path(m.log_path).read_text()
    assert "PASSTHROUGH" in re.search(r"negotiated (\S+)", log).group(1)
    assert "WRITEBACK_CACHE" not in re.search(r"negotiated (\S+)", log).group(1)
    c = counts(log)
    assert c.get("READ", 0) == 0
    assert c.get("WRITE", 0) == 3
    assert (up / "big").read_bytes() == big + b"+"
    assert (up / "new").read_bytes() == data
    assert (up / "log").read_bytes() == b"log"
    assert (up / "db").read_bytes() == b"db"


UNTAR = """
import os, sys, time
d = sys.argv[1]
i = 0
while True:
    fd = os.open(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, bytes([65 + i % 26]) * 32768)
    if i == 20:  # half written: the test freezes the mount now
        print("ready", flush=True)
        time.sleep(0.3)
    os.write(fd, bytes([65 + i % 26]) * 32768)
    os.fchmod(fd, 0o644)
    os.utime(fd, (1e9, 1e9))
    os.close(fd)
    i += 1
"""


def _passthrough_mount(tmp_path):
    need(os.geteuid() == 0, "passthrough needs CAP_SYS_ADMIN")
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    need(release >= (6, 9), "FUSE passthrough needs Linux 6.9")
    lo, mnt, up, wk = (tmp_path / n for n in ("lo", "mnt", "up", "wk"))
    for d in (lo, mnt, up, wk):
        d.mkdir()
    return native(mnt, [lo], up, wk), mnt, up, wk


def test_a_freeze_names_created_files_held_open_past_the_gate(tmp_path, fuse):
    """A file created for writing only passes its writes through to the upper, where the
    freeze gate cannot hold them: a freeze waits for it to be closed, and when it stays
    open gives up with an error that names it, leaving the mount writable; once it is
    closed the freeze holds."""
    from unionfs import control

    m, mnt, up, wk = _passthrough_mount(tmp_path)
    with m:
        f = open(mnt / "held", "wb")  # noqa: SIM115 - held open across the freezes
        try:
            f.write(b"x")
            f.flush()
            hold = control.Freeze(wk)
            try:
                with pytest.raises(OSError) as exc:
                    hold.freeze(wait=0.3)
            finally:
                hold.close()
            assert str(mnt / "held") in str(exc.value)
            assert "still open for writing" in str(exc.value)
            (mnt / "other").write_bytes(b"thawed")  # not frozen
            f.write(b"y")
        finally:
            f.close()
        with control.frozen(wk):
            assert (up / "held").read_bytes() == b"xy"
    assert (up / "other").read_bytes() == b"thawed"


def test_an_open_for_writing_that_would_join_a_created_file_waits_for_the_thaw(tmp_path, fuse):
    """A reader that joined a created file keeps it passing through after the creator
    closed it; an open for writing of it while the mount is frozen would write past the
    gate, so it is held until the thaw."""
    from unionfs import control

    m, mnt, up, wk = _passthrough_mount(tmp_path)
    with m:
        w = open(mnt / "new", "wb")  # noqa: SIM115
        w.write(b"abc")
        w.flush()
        r = open(mnt / "new", "rb")  # noqa: SIM115 - joins the creator on the upper file
        w.close()
        try:
            done = threading.Event()

            def writer() -> None:
                with open(mnt / "new", "r+b") as f:
                    f.write(b"Z")
                done.set()

            with control.frozen(wk):
                t = threading.Thread(target=writer)
                t.start()
                time.sleep(0.5)
                assert not done.is_set(), "an open for writing passed the frozen gate"
                assert (up / "new").read_bytes() == b"abc"
            t.join(30)
            assert done.is_set()
            assert r.read() == b"Zbc"
        finally:
            r.close()
    assert (up / "new").read_bytes() == b"Zbc"


def test_a_freeze_during_an_untar_holds_the_upper_still(tmp_path, fuse):
    """A writer that creates, writes, then sets mode and times of each file before closing
    it (as tar does), frozen while a file is half written: the freeze waits for the file
    open past the gate with the gate still open, so the writer can finish it (a gate
    closed first would hold its fchmod, and the freeze would wait in vain); then nothing
    in the upper changes until the thaw (a freeze that did not wait would let the second
    half through), and every file is whole afterwards."""
    from unionfs import control

    m, mnt, up, wk = _passthrough_mount(tmp_path)
    with m:
        (mnt / "d").mkdir()
        app = subprocess.Popen(
            ["python3", "-c", UNTAR, str(mnt / "d")], stdout=subprocess.PIPE, text=True
        )
        try:
            assert app.stdout is not None
            assert app.stdout.readline() == "ready\n"

            def snapshot() -> dict[str, tuple[int, float]]:
                out = {}
                for e in os.scandir(up / "d"):
                    st = e.stat()
                    out[e.name] = (st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode))
                return out

            with control.frozen(wk):
                before = snapshot()
                assert before["f20"] == (65536, 1e9, 0o644)  # finished before the hold
                time.sleep(0.5)
                assert snapshot() == before  # held still while frozen
            time.sleep(0.2)
            assert app.poll() is None
            assert len(snapshot()) > len(before)  # the writer went on after the thaw
        finally:
            app.kill()
            app.wait(timeout=30)
        names = sorted(os.listdir(up / "d"), key=lambda n: int(n[1:]))
        for name in names[:-1]:  # the last one may have been cut short by the kill
            i = int(name[1:])
            assert (up / "d" / name).read_bytes() == bytes([65 + i % 26]) * 65536, name


def test_security_selinux_without_selinux(tmp_path, lower, fuse):
    """On a host without SELinux, an unlabelled file answers security.selinux with
    EOPNOTSUPP, so `ls -l` stops asking after the first entry; a label a layer does carry
    is still answered."""
    need(not os.path.exists("/sys/fs/selinux"), "the host runs SELinux")
    need(os.geteuid() == 0, "setting a security.* xattr needs root")
    os.setxattr(lower / "dir" / "f5", "security.selinux", b"system_u:object_r:etc_t:s0\0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = native(mnt, [lower])
    with m:
        with pytest.raises(OSError) as exc:
            os.getxattr(mnt / "dir" / "f1", "security.selinux")
        assert exc.value.errno == errno.EOPNOTSUPP
        assert os.getxattr(mnt / "dir" / "f5", "security.selinux").startswith(b"system_u")
        out = subprocess.run(["ls", "-l", str(mnt / "dir")], capture_output=True, check=True)
        assert out.stdout.count(b"\n") == 21
    log = Path(m.log_path).read_text()
    asked = re.findall(r"GETXATTR #\d+ node \d+ \(b'security\.selinux'", log)
    assert len(asked) == 2 + 1  # our two calls, then ls stops after its first


def _killpriv_tree(lo: Path) -> None:
    """Files whose setuid/setgid/capability a write, a truncate or an O_TRUNC open clears."""
    for name, mode, gid in (("a", 0o6777, 0), ("b", 0o6767, 0), ("c", 0o6777, 0),
                            ("d", 0o6767, 0), ("e", 0o2767, 1000), ("r", 0o6777, 0)):  # fmt: skip
        (lo / name).write_bytes(b"data\n")
        os.chown(lo / name, 0, gid)
        os.chmod(lo / name, mode)
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service
    # (not on "r": root's write to a setuid file with a capability makes the kernel send an
    # empty SETATTR, which on the wire is chown(f, -1, -1), which clears setuid as the
    # kernel's chown does; kernel overlayfs keeps it there)
    os.setxattr(lo / "a", "security.capability", cap)


def _killpriv_work(mnt: Path) -> list[tuple[str, int, int, bool]]:
    user = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c"]
    script = (
        'echo x >> "$1/a"; echo y >> "$1/b"; truncate -s 2 "$1/c"; : > "$1/d"; echo z >> "$1/e"'
    )
    subprocess.run([*user, script, "sh", str(mnt)], check=True)
    with open(mnt / "r", "ab") as f:  # root keeps setuid/setgid (CAP_FSETID)
        f.write(b"root\n")
    for name in "fg":  # upper files, whose attributes the kernel holds: it must learn the
        (mnt / name).write_bytes(b"upper\n")  # new mode (setgid stayed in its cache, and
        os.chmod(mnt / name, 0o6666)  # on the disk after a fallocate: generic/683)
        os.stat(mnt / name)
    script = 'fallocate -o 0 -l 8192 "$1/f"; echo w >> "$1/g"'
    subprocess.run([*user, script, "sh", str(mnt)], check=True)
    out = []
    for name in "abcderfg":
        st = os.stat(mnt / name)
        try:
            has_cap = bool(os.getxattr(mnt / name, "security.capability"))
        except OSError:
            has_cap = False
        out.append((name, st.st_mode, st.st_size, has_cap))
    return out


@pytest.mark.parametrize("extra", ["", "writeback=1,passthrough=0"])
def test_killpriv_v2_matches_kernel_overlayfs(tmp_path, fuse, extra):
    """With FUSE_HANDLE_KILLPRIV_V2 the daemon clears setuid/setgid itself where the kernel
    says (write, truncate, open with O_TRUNC by a caller without CAP_FSETID): the modes,
    sizes and capabilities that follow are kernel overlayfs's, and no write asks for
    security.capability any more.  With the writeback cache an O_TRUNC open reaches the
    daemon as OPEN then SETATTR (no ATOMIC_O_TRUNC there: fuse/init.py)."""
    need(os.geteuid() == 0, "needs root (chown, setpriv, the kernel overlay)")
    from tests.mounts import KernelOverlay

    base = Path(tempfile.mkdtemp(prefix="nat-killpriv-", dir="/tmp"))  # a user can reach it
    try:
        os.chmod(base, 0o755)
        lo = base / "lo"
        lo.mkdir()
        _killpriv_tree(lo)
        results = []
        for kind in ("kernel", "layerfs"):
            mnt, up, wk = (base / f"{kind}-{n}" for n in ("mnt", "up", "wk"))
            for d in (mnt, up, wk):
                d.mkdir()
            m = (
                KernelOverlay(mnt, [lo], up, wk)
                if kind == "kernel"
                else native(mnt, [lo], up, wk, extra)
            )
            with m:
                results.append(_killpriv_work(mnt))
                with open(mnt / "plain", "wb", buffering=0) as f:
                    for _ in range(50):  # without KILLPRIV_V2: a GETXATTR before each
                        f.write(b"x")
            log = Path(m.log_path).read_text() if kind == "layerfs" else ""
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert results[1] == results[0]
    assert [r[1] & 0o7777 for r in results[1]] == [
        0o777, 0o767, 0o777, 0o767, 0o2767, 0o6777, 0o666, 0o666
    ]  # fmt: skip
    negotiated = re.search(r"negotiated (\S+)", log).group(1)
    assert "HANDLE_KILLPRIV_V2" in negotiated
    assert ("ATOMIC_O_TRUNC" in negotiated) == ("writeback=1" not in extra)
    # our 8 getxattr calls, and the kernel's check before the first write of each file (and
    # of every write to a setuid file, which the VFS never marks S_NOSEC) — not 50 more
    assert len(re.findall(r"GETXATTR #\d+ node \d+ \(b'security\.capability'", log)) < 30


@pytest.mark.parametrize("transport", ["native", "pyfuse3"])
def test_times_before_1970(tmp_path, lower, fuse, transport):
    """Seconds are signed in the kernel but u64 on the wire: a lower file from before 1970
    shows its time, and utime to such a time works (it was EIO: OverflowError)."""
    mnt, up, wk = (tmp_path / n for n in ("mnt", "up", "wk"))
    for d in (mnt, up, wk):
        d.mkdir()
    old = (-86_400 * 365 * 10 - 1) * 1_000_000_000 + 250_000_000  # 1960, and a fraction
    os.utime(lower / "dir" / "f0", ns=(old, old))
    opts = f"fuse={transport}" + (",debug" if transport == "native" else "")
    with LayerfsMount(mnt, [lower], up, wk, extra_opts=opts):
        st = os.stat(mnt / "dir" / "f0")
        assert (st.st_atime_ns, st.st_mtime_ns) == (old, old)
        os.utime(mnt / "dir" / "f1", ns=(old - 1, old + 7))
        st = os.stat(mnt / "dir" / "f1")
        assert (st.st_atime_ns, st.st_mtime_ns) == (old - 1, old + 7)
    st = os.stat(up / "dir" / "f1")
    assert (st.st_atime_ns, st.st_mtime_ns) == (old - 1, old + 7)


def test_writes_held_by_a_freeze_keep_their_own_data(tmp_path, fuse):
    """WRITE requests that wait at the freeze gate become tasks while the session reads on into
    its one buffer, which each WRITE's data is a view of until then: every held write must land
    with its own bytes after the thaw (without the copy, each got the last request's data)."""
    from unionfs import control

    lo, mnt, up, wk = (tmp_path / n for n in ("lo", "mnt", "up", "wk"))
    for d in (lo, mnt, up, wk):
        d.mkdir()
    m = native(mnt, [lo], up, wk)
    payloads = [bytes([65 + i]) * (256 << 10) for i in range(4)]
    with m:
        # read-write: a file created for writing only would pass through (passthrough.py)
        fds = [os.open(mnt / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(4)]
        try:
            with control.frozen(wk):
                writers = [
                    threading.Thread(target=os.pwrite, args=(fd, data, 0))
                    for fd, data in zip(fds, payloads, strict=True)
                ]
                for w in writers:
                    w.start()
                time.sleep(1)  # every WRITE is read and held meanwhile
                assert all(w.is_alive() for w in writers), "a write passed the frozen gate"
                assert all(os.stat(up / f"f{i}").st_size == 0 for i in range(4))
            for w in writers:
                w.join(30)
        finally:
            for fd in fds:
                os.close(fd)
        assert [(mnt / f"f{i}").read_bytes() == payloads[i] for i in range(4)] == [True] * 4
    assert [(up / f"f{i}").read_bytes() == payloads[i] for i in range(4)] == [True] * 4


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine, 217)


def _getdents(fd: int, size: int) -> list[tuple[int, bytes]]:
    """One getdents64(2) of at most `size` bytes: (d_off, name) of each entry."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    out, pos = [], 0
    raw = buf.raw[:n]
    while pos < n:
        d_off = int.from_bytes(raw[pos + 8 : pos + 16], "little", signed=True)
        reclen = int.from_bytes(raw[pos + 16 : pos + 18], "little")
        out.append((d_off, raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]))
        pos += reclen
    return out


def _change_while_reading(d: Path, change) -> list[bytes]:
    """xfstests' t_dir_offset2: the first getdents of an open directory, a change, the old
    fd read on to its end and a new one too, then every offset the new one gave seeked to
    and read again; the names read back."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _getdents(fd, 200)
        change()
        fd2 = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while _getdents(fd, 200):
                pass
            seen: list[tuple[int, bytes]] = []
            while batch := _getdents(fd2, 200):
                seen += batch
            back = []
            for i in range(len(seen) - 1, -1, -1):
                os.lseek(fd2, seen[i - 1][0] if i > 0 else 0, os.SEEK_SET)
                back.append(_getdents(fd2, 200)[0][1])
            assert back == [name for _, name in reversed(seen)]
            return [name for _, name in seen]
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


def test_reading_on_after_a_change_and_seeking_back(tmp_path, fuse):
    """A directory changed while open: the old fd reads on, a new one reads the change, and
    seeking back to each offset the new one gave reads that entry again (xfstests
    generic/637's steps, end to end; the dropped-listing case it met 4 runs in 8, EIO, is
    pinned down in process by test_fuse_wire's seeking-back test)."""
    mnt, lo, up, wk = (tmp_path / n for n in ("mnt", "lo", "up", "wk"))
    for d in (mnt, lo, up, wk):
        d.mkdir()
    with LayerfsMount(mnt, [lo], up, wk):
        d = mnt / "t"
        d.mkdir()
        names = _change_while_reading(d, lambda: (d / "0").touch())
        assert b"0" in names
        for n in range(1, 101):
            (d / str(n)).touch()
        for n in range(10, 101, 10):
            names = _change_while_reading(d, lambda n=n: os.unlink(d / str(n)))
            assert str(n).encode() not in names and len(names) == 2 + 101 - n // 10


def _walk_by_seeks(d: Path, limit: int) -> list[tuple[int, bytes]]:
    """xfstests' t_readdir_3: up to `limit` entries, each read alone from the offset the one
    before gave (lseek, getdents of one entry); (offset read from, name) of each."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out, pos = [], 0
        while len(out) < limit:
            os.lseek(fd, pos, os.SEEK_SET)
            got = _getdents(fd, 24 + 256)  # room for one entry
            if not got:
                break
            out.append((pos, got[0][1]))
            pos = got[0][0]
        return out
    finally:
        os.close(fd)


def test_offsets_stay_valid_while_a_directory_is_unchanged(tmp_path, fuse):
    """An offset names the same entry as long as the directory does not change, across
    reopens and rewinds, and every offset up to the last is one (xfstests generic/676: a
    listing not read to its end, so not in the kernel's cache, was listed from the start
    again under new offsets, a generation in their high bits; a seek to any smaller number
    then read the end of the directory)."""
    mnt, lo, up, wk = (tmp_path / n for n in ("mnt", "lo", "up", "wk"))
    for d in (mnt, lo, up, wk):
        d.mkdir()
    (lo / "low").mkdir()
    for i in range(150):
        (lo / "low" / f"l{i:03}").touch()
    with LayerfsMount(mnt, [lo], up, wk):
        (mnt / "low" / "l007").unlink()  # a merged listing with a whiteout
        (mnt / "new").mkdir()
        for i in range(150):
            (mnt / "new" / f"n{i:03}").touch()
        for d, count in ((mnt / "low", 2 + 149), (mnt / "new", 2 + 150)):
            part = _walk_by_seeks(d, count - 10)  # never to the end
            whole = _walk_by_seeks(d, count + 1)  # from the start again: the same offsets
            assert len(whole) == count and whole[: len(part)] == part
            top, by_pos = whole[-1][0], dict(whole)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for pos in range(top + 1):
                    os.lseek(fd, pos, os.SEEK_SET)
                    got = _getdents(fd, 24 + 256)
                    assert got, f"{d.name}: offset {pos} of {top} read the end"
                    if pos in by_pos:
                        assert got[0][1] == by_pos[pos]
            finally:
                os.close(fd)

"""Image mounts and their records under tag moves, concurrency and a killed daemon (issue 12,
items 2–6): names are unique while live, a record pins its image by digest (read-only ones
too), a commit whose daemon died is not tagged, and overlapping freezes finish."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imagestore import mountrecords
from imagestore.store import Store
from tests import imagedata
from tests.mounts import is_mounted, lazy_unmount
from tests.test_pull import LAYER

pytestmark = pytest.mark.mount


def run(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LAYER, args[0], "--root", str(root), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(root: Path, *args: str) -> str:
    r = run(root, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def clean_error(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """One line `layer: error: ...`, exit `code`, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layer: error: "), r.stderr
    return lines[0]


def unmount(*mnts: Path) -> None:
    for mnt in mnts:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            lazy_unmount(str(mnt))


def ps(root: Path) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(ok(root, "ps", "--format", "json"))}


def blobs(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs/sha256").iterdir()}


@pytest.fixture
def base(tmp_path, fuse) -> Path:
    """A store with the sample image pulled as `base`; the mounts a test makes under
    tmp_path/m* are always unmounted."""
    root = tmp_path / "store"
    imagedata.write_oci_layout(tmp_path / "layout")
    ok(root, "pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "base")
    for d in ("m1", "m2", "ro"):
        (tmp_path / d).mkdir()
    try:
        yield root
    finally:
        unmount(*(tmp_path / d for d in ("m1", "m2", "ro")))


# ----- item 2: one name, one live mount -----------------------------------------------------
def test_a_live_name_cannot_be_mounted_twice_nor_removed(tmp_path, base):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    ok(base, "mount", "base", str(m1), "--name", "x")
    line = clean_error(run(base, "mount", "base", str(m2), "--name", "x"))
    assert "mount x is live on" in line and not is_mounted(m2)
    (m1 / "kept").write_text("mine\n")
    assert "x is live" in clean_error(run(base, "rm", "x"))
    assert (base / "mounts/x/upper/kept").read_text() == "mine\n"
    assert ps(base)["x"]["mountpoint"] == str(m1)
    ok(base, "umount", "x")
    ok(base, "mount", "base", str(m2), "--name", "x")  # stopped: it may move
    assert (m2 / "kept").read_text() == "mine\n"


def test_two_mounts_of_one_name_at_once_one_wins(tmp_path, base):
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [LAYER, "mount", "--root", str(base), "base", str(m), "--name", "x"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for m in (m1, m2)
        ]
        codes = [p.wait(timeout=120) for p in procs]
        for p in procs:
            p.communicate()
        assert sorted(codes) == [0, 1], codes
        assert [is_mounted(m1), is_mounted(m2)] == [c == 0 for c in codes]
        live = m1 if codes[0] == 0 else m2
        assert ps(base)["x"]["mountpoint"] == str(live) and ps(base)["x"]["state"] == "live"
        ok(base, "umount", "x")


# ----- items 3 and 4: the record pins the image ---------------------------------------------
def test_a_mount_keeps_its_image_whatever_happens_to_the_tag(tmp_path, base):
    m1 = tmp_path / "m1"
    ok(base, "mount", "base", str(m1), "--name", "x")
    pinned = ps(base)["x"]["digest"]
    assert pinned == json.loads(ok(base, "inspect", "base"))["digest"]
    (m1 / "etc/hostname").write_text("first\n")
    ok(base, "commit", "x", "base")  # committing to the base's own name moves the tag
    assert json.loads(ok(base, "inspect", "base"))["digest"] != pinned
    (m1 / "second").write_text("2\n")
    assert "A /second" in ok(base, "diff", "x").splitlines()  # still against the pinned image
    ok(base, "rmi", "base")
    ok(base, "gc")
    assert ps(base)["x"]["digest"] == pinned
    assert "C /etc/hostname" in ok(base, "diff", "x").splitlines()
    ok(base, "commit", "x", "again:1")
    info = json.loads(ok(base, "inspect", "again:1"))
    assert len(info["layers"]) == 4  # the pinned image's three, plus one
    ok(base, "umount", "x")
    ok(base, "mount", "base", str(m1), "--name", "x")  # the tag is gone: the pin mounts
    assert (m1 / "second").read_text() == "2\n"
    assert (m1 / "etc/passwd").exists()
    ok(base, "umount", "x")
    ok(base, "mount", pinned, str(m1), "--name", "y")  # the pinned digest names the image
    ok(base, "umount", "y")
    ok(base, "rm", "x", "y")
    ok(base, "rmi", "again:1")
    ok(base, "gc")
    assert blobs(base) == set()  # unpinned: gone


def test_gc_keeps_the_image_of_a_live_read_only_mount(tmp_path, base):
    ro = tmp_path / "ro"
    before = blobs(base)
    ok(base, "mount", "base", str(ro), "--read-only")
    rec = ps(base)["ro"]
    assert rec["read_only"] and rec["state"] == "live"
    ok(base, "rmi", "base")
    ok(base, "gc")
    assert blobs(base) == before
    assert (ro / "etc/passwd").read_text().startswith("root:")
    assert sorted(os.listdir(ro / "etc"))  # the layers are still there
    ok(base, "umount", str(ro))
    assert "ro" not in ps(base)  # a read-only record goes with its mount
    ok(base, "gc")
    assert blobs(base) == set()


# ----- item 5: a commit whose daemon dies is not tagged ------------------------------------
def test_a_commit_whose_daemon_is_killed_fails_whole_and_ps_says_dead(tmp_path, base):
    m1 = tmp_path / "m1"
    ok(base, "mount", "base", str(m1), "--name", "x")
    with open(m1 / "big", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))  # random: gzip takes its time over it
    rec = mountrecords.load(Store.open(base), "x")
    assert rec is not None and rec.daemon is not None
    before_blobs, before_layers = blobs(base), set(os.listdir(base / "layers"))
    proc = subprocess.Popen(
        [LAYER, "commit", "--root", str(base), "x", "snap:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in (base / "ingest").glob("tmp-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(rec.daemon["pid"], signal.SIGKILL)  # while the mount is frozen
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "went away" in err and "Traceback" not in err
    assert "snap:1" not in ok(base, "images")
    assert blobs(base) == before_blobs
    assert set(os.listdir(base / "layers")) == before_layers
    state = ps(base)["x"]
    assert state["state"] == "dead" and not state["live"]
    assert "dead" in clean_error(run(base, "rm", "x"))
    assert "dead" in clean_error(run(base, "commit", "x", "snap:2"))
    ok(base, "umount", "x")
    assert ps(base)["x"]["state"] == "stopped"
    ok(base, "gc")
    ok(base, "images")


def test_a_daemon_that_is_exiting_or_a_zombie_is_not_alive():
    """`ps` must say dead as soon as a commit has seen the daemon go: a killed daemon closes
    its sockets while it exits, and stays a zombie until its new parent reaps it; both
    still have /proc/PID/stat with the recorded start time (`ps` once said live then)."""
    from cli import mounts as climounts

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1] != b"Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert climounts._start_time(pid) is None  # a zombie: gone, though not reaped
        me = {"pid": os.getpid(), "start": climounts._start_time(os.getpid())}
        assert me["start"] is not None and climounts.daemon_alive(me)
    finally:
        os.waitpid(pid, 0)


# ----- item 6: overlapping freezes on a busy mount ------------------------------------------
BIG_FILES, BIG = 48, 24 << 20


@pytest.fixture
def big_lower(tmp_path, fuse) -> Path:
    """A store whose image `big` has BIG_FILES files of BIG bytes each: every first write to
    one of them is a long copy-up, a mutating request in flight while a freeze waits."""
    root = tmp_path / "store"
    files = [(f"f{i}", "file", bytes(BIG)) for i in range(BIG_FILES)]
    imagedata.write_oci_layout(tmp_path / "layout", [files])
    ok(root, "pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "big")
    (tmp_path / "m1").mkdir()
    try:
        yield root
    finally:
        unmount(tmp_path / "m1")


def test_two_diffs_at_once_on_a_busy_mount_finish(tmp_path, big_lower):
    root, m1 = big_lower, tmp_path / "m1"
    ok(root, "mount", "big", str(m1), "--name", "x")
    todo = list(range(BIG_FILES))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer() -> None:  # copies the big files up, one after another
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                with open(m1 / f"f{i}", "r+b") as f:
                    f.write(b"w")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    rounds = 0
    try:
        while todo or rounds < 2:
            rounds += 1
            procs = [
                subprocess.Popen(
                    [LAYER, "diff", "--root", str(root), "x"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            try:
                for p in procs:
                    _, err = p.communicate(timeout=60)
                    assert p.returncode == 0, err
            except subprocess.TimeoutExpired:
                pytest.fail(f"two overlapping `layer diff` runs left the mount frozen ({rounds})")
            finally:
                for p in procs:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
    finally:
        todo.clear()
        rec = mountrecords.load(Store.open(root), "x")
        for t in threads:
            t.join(timeout=5)
        if any(t.is_alive() for t in threads) and rec is not None and rec.daemon:
            os.kill(rec.daemon["pid"], signal.SIGKILL)  # releases writers held by the gate
            for t in threads:
                t.join(timeout=30)
    assert errors == []
    (m1 / "after").write_text("usable\n")
    assert (root / "mounts/x/upper/after").read_text() == "usable\n"


# ----- item 12: a hung mountpoint is never stat-ed ------------------------------------------
def test_a_hung_mount_is_reported_and_unmounted_without_a_stat(tmp_path, base):
    m1 = tmp_path / "m1"
    ok(base, "mount", "base", str(m1), "--name", "x")
    rec = mountrecords.load(Store.open(base), "x")
    assert rec is not None and rec.daemon is not None
    pid = rec.daemon["pid"]
    os.kill(pid, signal.SIGSTOP)  # the daemon answers nothing: a stat of m1 would hang
    try:
        r = run(base, "mount", "base", str(m1), "--name", "y", timeout=20)
        assert "already mounted" in clean_error(r)
        assert ps(base)["x"]["state"] == "live"
        r = run(base, "umount", str(m1), timeout=20)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m1)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}"):  # unmounted: the daemon exits once it runs
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def test_an_image_mount_passes_layerfs_options(tmp_path, base):
    """`layer mount IMAGE -o ...` hands the options to the image's daemon; a bad one is
    layerfs's own error, and a read-only mount that failed leaves no record."""
    from cli import mounts as cli_mounts

    m1, ro = tmp_path / "m1", tmp_path / "ro"
    ok(base, "mount", "base", str(m1), "-o", "spin=0,passthrough=0")
    daemon = cli_mounts.daemon_of(str(m1))
    assert daemon is not None
    argv = Path(f"/proc/{daemon['pid']}/cmdline").read_bytes().split(b"\0")
    opts = argv[argv.index(b"-o") + 1].split(b",")
    assert b"spin=0" in opts and b"passthrough=0" in opts and b"nosuid" in opts
    assert (m1 / "etc/passwd").read_text().startswith("root:")
    ok(base, "umount", str(m1))
    r = run(base, "mount", "base", str(ro), "--read-only", "-o", "bogus=1")
    assert r.returncode == 2 and "unknown option bogus=1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(ro) and "ro" not in ps(base)

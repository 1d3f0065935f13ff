"""What podman's overlay driver asks of its mount_program (issue 13, items 1-4 and 6):
suid,dev as root, uidmapping/gidmapping, volatile, daemon logs kept, podman's option quirks.

Pure tests of the mapping, then real mounts (root) on both transports where the transport
matters (mount flags are set by each transport's own mount code).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounts import (
    LAYERFS,
    LayerfsMount,
    is_mounted,
    lazy_unmount,
    open_files,
    open_path_to,
)
from unionfs.daemon import LOG_NAME
from unionfs.errors import OptionError
from unionfs.idmap import IdMap, Owners, Range, parse
from unionfs.options import VOLATILE_MARKER, parse_args

PODMAN_MAP = ":0:100000:65536"  # what podman passes for --uidmap 0:100000:65536
TRANSPORTS = ["native", "pyfuse3"]


# ----- the mapping, as fuse-overlayfs's find_mapping ----------------------------------------
def test_mapping_format_and_both_directions():
    m = parse(PODMAN_MAP, "uidmapping", 65534)
    assert m.ranges == (Range(0, 100000, 65536),)
    assert [m.shown(i) for i in (0, 1000, 65535)] == [100000, 101000, 165535]
    assert [m.stored(i) for i in (100000, 101000, 165535)] == [0, 1000, 65535]
    # unmapped ids, either way, become the overflow id (as fuse-overlayfs)
    assert m.shown(65536) == 65534 and m.stored(0) == 65534 and m.stored(165536) == 65534
    two = parse("0:1000:1:1:100000:65535", "uidmapping", 7)
    assert two.shown(0) == 1000 and two.shown(1) == 100000 and two.stored(100004) == 5
    assert two.stored(1000) == 0 and two.stored(999) == 7


@pytest.mark.parametrize("value", ["0:1000", "a:1:1", "0:1:1:", "-1:0:5", "", ":::", "0:1:0"])
def test_bad_mappings_are_refused(value):
    if value == "0:1:1:":  # a trailing colon is an empty piece, skipped as in fuse-overlayfs
        assert parse(value, "uidmapping", 1).shown(0) == 1
        return
    with pytest.raises(OptionError, match="invalid mapping specified"):
        parse(value, "uidmapping", 65534)


def test_capability_root_id_is_shifted_and_v2_untouched():
    owners = Owners(IdMap((Range(0, 100000, 65536),), 65534), None)
    v3 = struct.pack("<IIIIII", 0x03000000, 1 << 12, 0, 0, 0, 5)
    assert owners.xattr_shown(b"security.capability", v3)[-4:] == struct.pack("<I", 100005)
    shown = owners.xattr_shown(b"security.capability", v3)
    assert owners.xattr_stored(b"security.capability", shown) == v3
    v2 = struct.pack("<IIIII", 0x02000001, 1 << 12, 0, 0, 0)
    assert owners.xattr_shown(b"security.capability", v2) == v2
    assert owners.xattr_shown(b"user.x", v3) == v3


def _acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acl_user_and_group_entries_are_shifted():
    owners = Owners(parse(PODMAN_MAP, "uidmapping", 65534), parse(":0:200000:65536", "g", 1))
    u = 0xFFFFFFFF
    stored = _acl((1, 6, u), (2, 4, 1000), (4, 4, u), (8, 5, 50), (0x10, 7, u), (0x20, 0, u))
    shown = _acl((1, 6, u), (2, 4, 101000), (4, 4, u), (8, 5, 200050), (0x10, 7, u), (0x20, 0, u))
    for name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        assert owners.xattr_shown(name, stored) == shown
        assert owners.xattr_stored(name, shown) == stored
    assert owners.xattr_shown(b"user.acl", stored) == stored  # only the ACL names
    odd = stored[:-3]  # not a whole number of entries: passed on for the kernel to refuse
    assert owners.xattr_shown(b"system.posix_acl_access", odd) == odd


# ----- options podman writes -----------------------------------------------------------------
@pytest.fixture
def dirs(tmp_path):
    for name in ("l1", "empty", "upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_podman_option_string_is_accepted(dirs):
    """containers/storage: `lowerdir=...:empty,upperdir=..,workdir=..,,volatile`, uid maps with
    a leading colon, `context=` where there is no SELinux."""
    d = dirs
    opts = (
        f"lowerdir={d}/l1:{d}/empty,upperdir={d}/upper,workdir={d}/work,,volatile,"
        f"uidmapping={PODMAN_MAP},gidmapping={PODMAN_MAP}"
    )
    cfg = parse_args(["-o", opts, str(d / "mnt")])
    assert cfg.lowers == [str(d / "l1"), str(d / "empty")] and cfg.volatile
    assert cfg.owners.uids and cfg.owners.uids.shown(0) == 100000
    assert cfg.owners.gids and cfg.owners.gids.stored(100001) == 1


# ----- real mounts ---------------------------------------------------------------------------
def _mount_flags(mnt: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            return set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_root_mounts_suid_dev_unless_told(dirs, root, fuse, transport):
    """Item 1: as root layerfs mounts suid,dev (kernel overlayfs and fuse-overlayfs do);
    nosuid/nodev are honoured.  (`layer mount` passing nosuid,nodev: test_store_private.)"""
    d = dirs
    with LayerfsMount(d / "mnt", [d / "l1"], d / "upper", d / "work", f"fuse={transport}"):
        flags = _mount_flags(d / "mnt")
        assert "nosuid" not in flags and "nodev" not in flags, flags
    with LayerfsMount(d / "mnt", [d / "l1"], d / "upper", d / "work", f"fuse={transport},nosuid"):
        flags = _mount_flags(d / "mnt")
        assert "nosuid" in flags and "nodev" not in flags, flags
    with LayerfsMount(d / "mnt", [d / "l1"], d / "upper", d / "work", f"fuse={transport},nodev"):
        flags = _mount_flags(d / "mnt")
        assert "nosuid" not in flags and "nodev" in flags, flags


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_uidmapping_shifts_ownership_both_ways(dirs, root, fuse, transport):
    """Item 2: stored 0 and 1000 show as 100000 and 101000; chown, a new file's owner and
    copy-up store the unshifted ids in the upper."""
    d = dirs
    (d / "l1" / "root-file").write_text("r")
    (d / "l1" / "user-file").write_text("u")
    os.chown(d / "l1" / "user-file", 1000, 1001)
    (d / "l1" / "dir").mkdir(mode=0o777)
    os.chmod(d / "l1" / "dir", 0o777)
    v3 = struct.pack("<IIIIII", 0x03000000, 1 << 12, 0, 0, 0, 5)
    os.setxattr(d / "l1" / "root-file", "security.capability", v3)
    maps = f"uidmapping={PODMAN_MAP},gidmapping={PODMAN_MAP},fuse={transport}"
    open_path_to(d)  # pytest's temp dirs are 0700: let uid 100000 reach the mount
    mnt = d / "mnt"
    with LayerfsMount(mnt, [d / "l1"], d / "upper", d / "work", maps):
        st = os.stat(mnt / "root-file")
        assert (st.st_uid, st.st_gid) == (100000, 100000)
        st = os.stat(mnt / "user-file")
        assert (st.st_uid, st.st_gid) == (101000, 101001)
        cap = os.getxattr(mnt / "root-file", "security.capability")
        assert struct.unpack_from("<I", cap, len(cap) - 4)[0] == 100005, cap.hex()
        os.chown(mnt / "root-file", 100007, 100008)  # copy-up, then chown: stored 7:8
        assert os.stat(mnt / "root-file").st_uid == 100007
        # a process of the container's root (host uid 100000) creates a file and a directory
        subprocess.run(
            ["setpriv", "--reuid=100000", "--regid=100000", "--clear-groups", "sh", "-c",
             f"echo new > {mnt}/dir/new && mkdir {mnt}/dir/sub"],
            check=True, timeout=30,
        )  # fmt: skip
        assert os.stat(mnt / "dir" / "new").st_uid == 100000
        os.chown(mnt / "user-file", 1, 1)  # an id outside the map: stored as the overflow id,
        assert os.stat(mnt / "user-file").st_uid == 165534  # which the map then shifts
    up = d / "upper"
    assert (os.stat(up / "root-file").st_uid, os.stat(up / "root-file").st_gid) == (7, 8)
    assert os.stat(up / "dir" / "new").st_uid == 0 and os.stat(up / "dir" / "sub").st_gid == 0
    assert os.stat(up / "user-file").st_uid == 65534
    with LayerfsMount(mnt, [d / "l1"], d / "upper", d / "work", maps):
        # ACL entries name ids too: shown shifted (the kernel checks access with them),
        # stored unshifted; the named user 100005 of the container is 5 in the upper
        u = 0xFFFFFFFF
        acl = _acl((1, 6, u), (2, 6, 100005), (4, 4, u), (0x10, 6, u), (0x20, 4, u))
        os.setxattr(mnt / "dir" / "new", "system.posix_acl_access", acl)
        assert os.getxattr(mnt / "dir" / "new", "system.posix_acl_access") == acl
    stored = os.getxattr(up / "dir" / "new", "system.posix_acl_access")
    assert struct.unpack_from("<I", stored, 4 + 8 + 4)[0] == 5
    with pytest.raises(OSError):  # a chown drops file capabilities, through the mount too
        os.getxattr(up / "root-file", "security.capability")


def test_volatile_marker_refuses_the_next_mount(dirs, root, fuse):
    """Item 3, the kernel's semantics: work/incompat/volatile/dirty is made by the mount and
    kept; a later mount of that work dir is refused until it is removed (podman removes it
    before each mount); fsync answers without syncing."""
    d = dirs
    opts = "volatile"
    with LayerfsMount(d / "mnt", [d / "l1", d / "empty"], d / "upper", d / "work", opts):
        assert (d / "work" / VOLATILE_MARKER / "dirty").is_file()
        fd = os.open(d / "mnt" / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"data")
            os.fsync(fd)
        finally:
            os.close(fd)
    assert (d / "upper" / "f").read_bytes() == b"data"
    assert (d / "work" / VOLATILE_MARKER).is_dir()
    for extra in ("volatile", ""):  # the kernel refuses with or without volatile
        r = subprocess.run(
            [LAYERFS, "-f", "-o", f"lowerdir={d}/l1,upperdir={d}/upper,workdir={d}/work"
             + (f",{extra}" if extra else ""), str(d / "mnt")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 2 and "used by a volatile mount" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not is_mounted(d / "mnt")
    (d / "work" / VOLATILE_MARKER / "dirty").unlink()
    (d / "work" / VOLATILE_MARKER).rmdir()
    with LayerfsMount(d / "mnt", [d / "l1"], d / "upper", d / "work"):
        assert (d / "mnt" / "f").read_bytes() == b"data"


def _daemon_pid(mnt: Path) -> int:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if os.fsencode(mnt) in argv and any(a.endswith(b"layerfs") for a in argv):
                return int(entry.name)
    raise AssertionError(f"no layerfs daemon for {mnt}")


@pytest.mark.parametrize("where", ["log-option", "work-dir"])
def test_daemon_logs_are_kept(dirs, root, fuse, where):
    """Item 4: a daemonized layerfs logs to -o log=FILE, or without syslog to layerfs.log in
    the work dir; the shutdown line proves the file is written after the terminal is gone."""
    d = dirs
    opts = f"lowerdir={d}/l1,upperdir={d}/upper,workdir={d}/work"
    if where == "log-option":
        expected = d / "my.log"
        opts += f",log={expected}"
    elif os.path.exists("/dev/log"):
        expected = None  # syslog has it: the fallback is only for machines without one
    else:
        expected = d / "work" / LOG_NAME
    r = subprocess.run([LAYERFS, "-o", opts, str(d / "mnt")], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    try:
        pid = _daemon_pid(d / "mnt")
        _wait_for_signal_handler(pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while is_mounted(d / "mnt") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(d / "mnt")
    finally:
        if is_mounted(d / "mnt"):
            lazy_unmount(str(d / "mnt"))
    if expected is None:
        assert not (d / "work" / LOG_NAME).exists()
        return
    deadline = time.monotonic() + 10
    while "unmounting" not in _read(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = _read(expected)
    assert f"layerfs[{pid}] INFO signal {int(signal.SIGTERM)}: unmounting" in text, text
    assert os.stat(expected).st_mode & 0o777 == 0o600


def _wait_for_signal_handler(pid: int) -> None:
    """The native transport answers INIT before it imports trio and installs its SIGTERM
    handler (start-up time); a SIGTERM before that kills it without unmounting.  Wait until
    /proc says SIGTERM is caught."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (15 - 1)):
                return
        time.sleep(0.05)
    raise AssertionError(f"layerfs {pid} never caught SIGTERM")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_a_daemon_lets_go_of_the_callers_directory_and_its_log_at_unmount(dirs, root, fuse):
    """A daemonized layerfs works from / (its cwd would pin the caller's filesystem: here a
    lower layer's), keeps its log file open only while mounted, and exits after umount.
    (That the log file and the control socket are closed first thing at unmount, so that
    `umount MNT; umount UPPERFS` works back to back, is a race; measured, not tested.)"""
    d = dirs
    opts = f"lowerdir={d}/l1,upperdir={d}/upper,workdir={d}/work,log={d}/work/x.log"
    r = subprocess.run(
        [LAYERFS, "-o", opts, str(d / "mnt")], capture_output=True, timeout=30, cwd=d / "l1"
    )
    assert r.returncode == 0, r.stderr
    try:
        pid = _daemon_pid(d / "mnt")
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        # opened once the parent has returned (the caller's output is let go of first)
        deadline = time.monotonic() + 20
        while f"{d}/work/x.log" not in open_files(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert f"{d}/work/x.log" in open_files(pid), "the log file is open while mounted"
    finally:
        subprocess.run(["umount", str(d / "mnt")], timeout=30)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

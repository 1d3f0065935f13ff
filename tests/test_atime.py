"""The mount's access-time flags as the daemon reads them (unionfs/atime.py), in process;
test_kernel_parity's atime test runs them against kernel overlayfs."""

from __future__ import annotations

from unionfs.atime import AtimePolicy, flags_of

_TABLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    b"45 22 0:40 / /m\\040n rw,noatime - fuse.layerfs layerfs rw,user_id=0\n"
    b"46 22 0:41 / /other rw,relatime - fuse.layerfs layerfs ro,user_id=0\n"
    b"47 22 0:40 / /bound ro,relatime - fuse.layerfs layerfs rw,user_id=0\n"
)


def test_flags_decide_what_reads_may_mark():
    assert flags_of(set()) == (True, True)
    assert flags_of({"relatime"}) == (True, True)
    assert flags_of({"nodiratime"}) == (True, False)
    assert flags_of({"noatime", "nodiratime"}) == flags_of({"ro"}) == (False, False)


def test_our_mount_is_found_by_its_path_then_followed_by_its_device():
    """The mountpoint's line (its octal escapes read), per-mount flags and a read-only
    superblock; once seen, the mount is known by its device, at its place first and
    wherever else it shows when moved; another FUSE mount never counts."""
    policy = AtimePolicy("/m n", set())
    dev, options = policy.pick(_TABLE)  # type: ignore[misc]
    assert dev == b"0:40" and "noatime" in options and "ro" not in options
    policy._dev = dev
    moved = _TABLE.replace(b" /m\\040n ", b" /elsewhere ")
    assert policy.pick(moved) == (b"0:40", {"rw", "noatime"})  # the first of its lines
    assert policy.pick(_TABLE.replace(b"0:40", b"0:99")) is None
    other = AtimePolicy("/other", {"noatime"})
    assert other.pick(_TABLE) == (b"0:41", {"rw", "relatime", "ro"})  # a ro superblock


def test_without_a_mountpoint_the_options_decide():
    policy = AtimePolicy(None, {"nodiratime"})
    assert (policy.current().files, policy.current().dirs) == (True, False)

"""Named scenarios where layerfs must do exactly what kernel overlayfs does, each found by a
conformance run (pjdfstest, a differential fuzzer) against an earlier layerfs:

  - a redirect written under a moved directory names where the lower part *is* (the kernel's
    format), so the upper means the same after a remount, to layerfs, the kernel and commit;
  - chown(path, -1, -1) updates the ctime of every file type;
  - mknod of a 0/0 character device (a whiteout on disk) is refused with EPERM;
  - redirect_dir=off/follow/nofollow: moving a directory with lower parts gives EXDEV, and
    nofollow refuses to look up a directory that carries a redirect;
  - one upper and work dir serve one mount at a time;
  - what is renamed onto a whited-out name takes over hiding the lower object there: moved
    away again it leaves a whiteout, and a directory becomes opaque;
  - a copied-up file's data is on disk before the file goes into the upper (unless volatile);
  - a hard-linked upper file whose open name is removed stays one file with its other names,
    which this mount never looked up: no stale size or data there, and a name renamed over
    never makes the open file act on what replaced it;
  - a file reached by two names stays reachable after the kernel forgot the directory of one
    and that directory was renamed;
  - a redirect counts in every layer: a directory moved in a mount whose upper is now a
    lower layer keeps its lower part (unionmount-testsuite `--ov=3`);
  - a file's st_ino is the same in every mount of the same layers, also when they are on
    different filesystems, and a copied-up file keeps its lower original's over a remount
    (the kernel's `overlay.origin`, written and read; unionmount-testsuite `--ov=3 --verify`);
  - directories that hold copied-up or moved objects are marked `overlay.impure`, so the
    kernel mounting layerfs's upper gives readdir the numbers stat gives; a directory made
    in a merged one is opaque where the kernel makes it so;
  - a directory removed while open, or while it is a process's cwd, still answers fstat
    (its last attributes, no link), as the kernel's (xfstests generic/035);
  - renameat2(RENAME_WHITEOUT) is refused (EINVAL), not taken for a plain rename
    (xfstests generic/078);
  - copy_file_range(2) into a file whose flags forbid writing is refused (EPERM), also
    through a handle opened before `chattr +i` (xfstests generic/553);
  - a new upper gets the kernel's persistent `overlay.uuid` on its root, per `uuid=`;
  - with every layer on one filesystem, files show their real numbers, as on the kernel
    (they had 2^48 added: a 32-bit program's stat(2) of any of them failed, EOVERFLOW).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagestore import changeset
from tests import mounts, treecmp
from tests.layerdata import write
from tests.mounts import LAYERFS, KernelOverlay, LayerfsMount, overlay_options
from tests.ops import value_or_errno
from unionfs import fsutil, markers

pytestmark = pytest.mark.mount


def _redirect_lower(lower: Path) -> None:
    """The layer of the reported data loss (names with spaces, dots and non-ASCII)."""
    for d in ("a 3/.h2/a", "a 3/.h2/é2", "a/sub/日本語/é2", "a/long name .txt 3/x"):
        (lower / d).mkdir(parents=True)
    write(lower / "a 3/.h2/f2 3", b"f2\n")
    write(lower / "a/long name .txt 3/x/y", b"y\n")


def _moves(mnt: Path) -> None:
    m = os.fsencode(mnt) + b"/"
    u = os.fsencode
    fsutil.renameat2(m + u("a 3"), m + u("a/sub/日本語/f1"), fsutil.RENAME_NOREPLACE)
    os.rename(m + u("a/sub/日本語/f1/.h2/a"), m + u("a/sub/日本語/é2"))
    fsutil.renameat2(
        m + u("a/sub/日本語/f1/.h2"), m + u("a/long name .txt 3"), fsutil.RENAME_EXCHANGE
    )


def _side(root: Path, name: str) -> tuple[Path, Path, Path, Path]:
    d = root / name
    lower, upper, work, mnt = d / "lower", d / "upper", d / "work", d / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    _redirect_lower(lower)
    return lower, upper, work, mnt


def test_redirects_under_moved_directories_survive_a_remount(tmp_path, fuse, root):
    lo, up, wk, mnt = _side(tmp_path, "layerfs")
    klo, kup, kwk, kmnt = _side(tmp_path, "kernel")
    with LayerfsMount(mnt, [lo], up, wk):
        _moves(mnt)
        ours = treecmp.snapshot(mnt)
    with KernelOverlay(kmnt, [klo], kup, kwk, "redirect_dir=on"):
        _moves(kmnt)
        theirs = treecmp.snapshot(kmnt)
    assert (
        b"/a/long name .txt 3/f2 3" in ours
        and b"/a/sub/\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e/\xc3\xa92/a" not in ours
    )
    assert treecmp.diff(ours, theirs, compare_mtime=False) == []
    # the kernel's format: the path where the lower part lives, not the merged path
    moved = os.fsencode(up / "a/long name .txt 3")
    assert os.getxattr(moved, markers.redirect_xattr()) == b"/a 3/.h2"
    assert os.getxattr(up / "a/sub/日本語/é2", markers.redirect_xattr()) == b"/a 3/.h2/a"
    with LayerfsMount(mnt, [lo], up, wk):
        again = treecmp.snapshot(mnt)
    assert treecmp.diff(ours, again, compare_mtime=False) == []
    kcheck, kwork2 = tmp_path / "kcheck", tmp_path / "kwork2"
    kcheck.mkdir()
    kwork2.mkdir()
    with KernelOverlay(kcheck, [lo], up, kwork2, "redirect_dir=on"):
        kernel_reads = treecmp.snapshot(kcheck)
    assert treecmp.diff(ours, kernel_reads, compare_mtime=False) == []
    added = changeset.changes(up, [lo]).added
    assert "/a/long name .txt 3/f2 3" in added and "/a/sub/日本語/é2/é2" not in added


def test_relative_redirect_inside_a_moved_parent(tmp_path, fuse, root):
    """A rename within one directory writes a relative redirect (as the kernel does); when
    that directory's parent moved, it resolves in the parent's lower part."""
    lo, up, wk, mnt = tmp_path / "lo", tmp_path / "up", tmp_path / "wk", tmp_path / "mnt"
    for p in (up, wk, mnt):
        p.mkdir()
    write(lo / "p/c/file", b"deep\n")
    with LayerfsMount(mnt, [lo], up, wk):
        os.rename(mnt / "p", mnt / "q")
        os.rename(mnt / "q/c", mnt / "q/c2")
        assert (mnt / "q/c2/file").read_bytes() == b"deep\n"
    assert os.getxattr(up / "q/c2", markers.redirect_xattr()) == b"c"
    with LayerfsMount(mnt, [lo], up, wk):
        assert (mnt / "q/c2/file").read_bytes() == b"deep\n"
    kmnt, kwk = tmp_path / "kmnt", tmp_path / "kwk"
    kmnt.mkdir()
    kwk.mkdir()
    with KernelOverlay(kmnt, [lo], up, kwk, "redirect_dir=on"):
        assert (kmnt / "q/c2/file").read_bytes() == b"deep\n"
    assert "/q/c2/file" in changeset.changes(up, [lo]).added


def _rotated_moves(base: Path, engine: str) -> list[Path]:
    """unionmount-testsuite's `--ov=3` rename-new-pop-dir, by `engine`: after each move the
    mount ends and its upper becomes the top lower layer of the next mount.  A directory is
    made, filled and moved there and back, one mount each, so the redirects it leaves live
    in lower layers.  Returns the layers, top first."""
    layers = [base / "l0"]
    (layers[0] / "a").mkdir(parents=True)
    steps: list[Callable[[Path], None]] = [
        lambda m: (m / "a/new").mkdir(),
        lambda m: (write(m / "a/new/f", b"f\n"), os.rename(m / "a/new", m / "a/away")),
        lambda m: os.rename(m / "a/away", m / "a/new"),
    ]
    for n, step in enumerate(steps, 1):
        up, wk, mnt = base / f"u{n}", base / f"w{n}", base / f"m{n}"
        for p in (up, wk, mnt):
            p.mkdir()
        lowers = list(reversed(layers))
        if engine == "kernel":
            with KernelOverlay(mnt, lowers, up, wk, "redirect_dir=on"):
                step(mnt)
        else:
            with LayerfsMount(mnt, lowers, up, wk):
                step(mnt)
        layers.append(up)
    return list(reversed(layers))


@pytest.mark.parametrize("producer", ["kernel", "layerfs"])
def test_a_directory_moved_in_a_lower_layer_keeps_its_lower_part(tmp_path, fuse, root, producer):
    """Redirects count in every layer, not only the upper: the directory moved back to `new`
    in the third mount carries redirect `away` (the name its lower part has one layer down),
    which carries redirect `new` again; the file made in the second mount lives below both.
    It was lost when only the upper's redirects were followed."""
    layers = _rotated_moves(tmp_path / "layers", producer)
    if producer == "kernel":  # the layers say what the test means
        assert os.getxattr(layers[0] / "a/new", markers.redirect_xattr()) == b"away"
        assert os.getxattr(layers[1] / "a/away", markers.redirect_xattr()) == b"new"
    seen = {}
    for engine in ("kernel", "layerfs"):
        up, wk, mnt = (tmp_path / engine / p for p in ("up", "wk", "mnt"))
        for p in (up, wk, mnt):
            p.mkdir(parents=True)
        if engine == "kernel":
            with KernelOverlay(mnt, layers, up, wk, "redirect_dir=on"):
                seen[engine] = treecmp.snapshot(mnt)
        else:
            with LayerfsMount(mnt, layers, up, wk):
                seen[engine] = treecmp.snapshot(mnt)
                assert (mnt / "a/new/f").read_bytes() == b"f\n"
                os.rename(mnt / "a/new", mnt / "a/moved")  # and once more, from the merged view
            with LayerfsMount(mnt, layers, up, wk):
                assert sorted(os.listdir(mnt / "a")) == ["moved"]
                assert (mnt / "a/moved/f").read_bytes() == b"f\n"
            # a commit of that upper holds the moved tree, file included
            changes = changeset.changes(up, list(reversed(layers)))
            assert "/a/moved/f" in changes.added and "/a/new" in changes.deleted
    assert b"/a/new/f" in seen["layerfs"]
    assert treecmp.diff(seen["layerfs"], seen["kernel"], compare_mtime=False) == []


def test_a_redirect_in_a_lower_layer_is_refused_with_nofollow(tmp_path, fuse, root):
    """redirect_dir=nofollow refuses a redirect wherever the kernel's lookup meets one."""
    layers = _rotated_moves(tmp_path / "layers", "layerfs")
    up, wk, mnt = tmp_path / "up", tmp_path / "wk", tmp_path / "mnt"
    for p in (up, wk, mnt):
        p.mkdir()
    for engine in ("kernel", "layerfs"):
        mount = KernelOverlay if engine == "kernel" else LayerfsMount
        with mount(mnt, layers, up, wk, "redirect_dir=nofollow"):
            for path in ("a/new", "a/new/f"):
                with pytest.raises(PermissionError):
                    os.stat(mnt / path)
            assert (mnt / "a").is_dir()


@pytest.fixture
def union(tmp_path, fuse, root):
    lo, up, wk, mnt = tmp_path / "lo", tmp_path / "up", tmp_path / "wk", tmp_path / "mnt"
    for p in (up, wk, mnt):
        p.mkdir()
    write(lo / "d/f", b"f\n")
    write(lo / "file", b"file\n")
    os.symlink("file", lo / "link")
    os.mkfifo(lo / "fifo")
    return lo, up, wk, mnt


def test_chown_minus_one_updates_ctime_of_every_type(union):
    lo, up, wk, mnt = union
    with LayerfsMount(mnt, [lo], up, wk):
        for name in ("d", "file", "link", "fifo"):
            os.chown(mnt / name, 0, 0, follow_symlinks=False)  # copied up: a later ctime
            time.sleep(0.02)  # is the chown's own, not the copy's
            before = os.lstat(mnt / name).st_ctime_ns
            time.sleep(0.02)  # ext4 stamps times with a coarse clock
            os.chown(mnt / name, -1, -1, follow_symlinks=False)
            assert os.lstat(mnt / name).st_ctime_ns > before, name


def test_mknod_of_a_whiteout_device_is_refused(union):
    lo, up, wk, mnt = union
    with LayerfsMount(mnt, [lo], up, wk):
        with pytest.raises(PermissionError):
            os.mknod(mnt / "wh", 0o600 | 0o020000, os.makedev(0, 0))
        assert not (mnt / "wh").exists() and not (up / "wh").exists()
        os.mknod(mnt / "null", 0o600 | 0o020000, os.makedev(1, 3))  # any other device works
        assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize("mode", ["off", "follow", "nofollow"])
def test_redirect_dir_without_on_gives_exdev(union, mode):
    lo, up, wk, mnt = union
    with LayerfsMount(mnt, [lo], up, wk, extra_opts=f"redirect_dir={mode}"):
        with pytest.raises(OSError) as exc:
            os.rename(mnt / "d", mnt / "e")
        assert exc.value.errno == errno.EXDEV
        os.mkdir(mnt / "new")  # a directory of the upper alone still moves
        os.rename(mnt / "new", mnt / "new2")
        os.rename(mnt / "file", mnt / "file2")  # and non-directories always do
        assert sorted(os.listdir(mnt)) == ["d", "fifo", "file2", "link", "new2"]


def test_redirect_dir_nofollow_refuses_a_redirected_directory(union):
    lo, up, wk, mnt = union
    with LayerfsMount(mnt, [lo], up, wk):
        os.rename(mnt / "d", mnt / "e")
    for mode, expect in (("follow", b"f\n"), ("nofollow", None)):
        with LayerfsMount(mnt, [lo], up, wk, extra_opts=f"redirect_dir={mode}"):
            if expect is None:
                with pytest.raises(PermissionError):
                    os.stat(mnt / "e")
            else:
                assert (mnt / "e/f").read_bytes() == expect


def test_a_second_mount_of_the_same_upper_is_refused(union, tmp_path):
    lo, up, wk, mnt = union
    mnt2, wk2 = tmp_path / "mnt2", tmp_path / "wk2"
    mnt2.mkdir()
    wk2.mkdir()
    with LayerfsMount(mnt, [lo], up, wk):
        (mnt / "mine").write_bytes(b"first mount\n")
        for work in (wk, wk2):  # the same work dir, or the same upper with another one
            opts = overlay_options([lo], up, work)
            r = subprocess.run(
                [LAYERFS, "-o", opts, str(mnt2)], capture_output=True, text=True, timeout=30
            )
            assert r.returncode != 0
            assert "in use by another mount" in r.stderr
        assert (mnt / "mine").read_bytes() == b"first mount\n"
        assert sorted(os.listdir(wk)) == ["layerfs"]  # its work area was left alone
    # once unmounted, the same dirs mount again
    with LayerfsMount(mnt2, [lo], up, wk2):
        assert (mnt2 / "mine").read_bytes() == b"first mount\n"
    shutil.rmtree(wk2)


def test_the_same_dirs_mount_again_right_after_an_unmount(union):
    """Kernel overlayfs frees its upper and work dirs when umount returns.  `fusermount3 -u`
    returns before layerfs's daemon has exited and dropped its locks on them (right after a
    mount it may still be importing its handlers), so a mount of the same dirs at once must
    wait for the old daemon, not refuse them as in use (it did, about one time in two)."""
    lo, up, wk, mnt = union
    opts = overlay_options([lo], up, wk)
    for i in range(6):
        r = subprocess.run([LAYERFS, "-o", opts, str(mnt)], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        try:
            assert r.returncode == 0, f"mount {i}: {r.stderr}"
            if i == 0:
                (mnt / "kept").write_bytes(b"from the first mount\n")
        finally:
            if mounts.is_mounted(str(mnt)):
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=15)
            mounts.lazy_unmount(str(mnt))
    with LayerfsMount(mnt, [lo], up, wk):
        assert (mnt / "kept").read_bytes() == b"from the first mount\n"


@contextlib.contextmanager
def _tmpfs(*paths: Path) -> Iterator[None]:
    """Each of `paths` (made here) a tmpfs of its own for the block, unmounted after it."""
    mounted: list[Path] = []
    try:
        for p in paths:
            p.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "layertest", str(p)], check=True, timeout=30)
            mounted.append(p)
        yield
    finally:
        for p in reversed(mounted):
            subprocess.run(["umount", str(p)], timeout=30)


@contextlib.contextmanager
def _layers_on_tmpfs(tmp_path: Path) -> Iterator[tuple[list[Path], Path]]:
    """A lower (holding `f`) and an upper's filesystem (`u`, `w`), each a tmpfs; the mountpoint."""
    fss = [tmp_path / "lofs", tmp_path / "upfs"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _tmpfs(*fss):
        write(fss[0] / "f", b"lower\n")
        (fss[1] / "u").mkdir()
        (fss[1] / "w").mkdir()
        yield fss, mnt


def test_the_daemon_pins_no_layer_filesystem(tmp_path, fuse, root):
    """Kernel overlayfs lets `umount MNT; umount LAYERFS` run back to back.  FUSE's unmount
    does not wait for the daemon to exit, so the daemon must hold nothing open on its
    layers' filesystems while it idles (lock files and sockets live elsewhere)."""
    with _layers_on_tmpfs(tmp_path) as (fss, mnt):
        devs = {os.stat(fs).st_dev for fs in fss}
        with LayerfsMount(mnt, [fss[0]], fss[1] / "u", fss[1] / "w") as m:
            (mnt / "f").write_bytes(b"changed\n")
            assert (mnt / "f").read_bytes() == b"changed\n"
            assert m.proc is not None
            deadline = time.monotonic() + 5  # the kernel sends RELEASE after close() returns
            while True:
                open_now = mounts.open_files(m.proc.pid)
                pinned = [name for name, st in open_now.items() if st.st_dev in devs]
                if not pinned or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert pinned == []
    assert (tmp_path / "upfs").exists() and not any(
        mp.startswith(str(tmp_path)) for mp, _ in mounts.mounts()
    )


def test_umount_and_the_upper_filesystem_back_to_back_right_after_the_mount(tmp_path, fuse, root):
    """The same, right after the mount: the daemon answers before it has loaded trio (issue
    11, `Session.serve_early`), and unmounted then, it must let go of the work dir's
    filesystem at once (the control socket is bound there), not after importing trio:
    unionmount-testsuite's quickest tests met `umount /upper: target is busy`."""
    with _layers_on_tmpfs(tmp_path) as (fss, mnt):
        with LayerfsMount(mnt, [fss[0]], fss[1] / "u", fss[1] / "w"):
            assert (mnt / "f").read_bytes() == b"lower\n"
            (mnt / "new").write_bytes(b"x")
            subprocess.run(["umount", str(mnt)], check=True, timeout=30)
            deadline = time.monotonic() + 0.05  # the daemon's exit, not trio's import
            while True:
                r = subprocess.run(["umount", str(fss[1])], capture_output=True, timeout=30)
                if r.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            assert r.returncode == 0, r.stderr


def test_st_ino_is_the_same_in_every_mount_of_the_same_layers(tmp_path, fuse, root):
    """Layers on two filesystems: a file's st_ino must not depend on what a mount looked up
    first (the device index in its high bits was handed out in order of first use)."""
    fss = [tmp_path / "lofs", tmp_path / "upfs"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _tmpfs(*fss):
        write(fss[0] / "l", b"lower\n")
        write(fss[1] / "u/u", b"upper\n")
        (fss[1] / "w").mkdir()
        seen = []
        for order in (("l", "u"), ("u", "l")):
            with LayerfsMount(mnt, [fss[0]], fss[1] / "u", fss[1] / "w"):
                seen.append({name: os.lstat(mnt / name).st_ino for name in order})
        assert seen[0] == seen[1]
        assert seen[0]["l"] != seen[0]["u"]


def _origin(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "trusted.overlay.origin", follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return None


def _copy_ups(mnt: Path) -> None:
    with open(mnt / "f", "ab") as f:
        f.write(b"more\n")
    os.utime(mnt / "s", follow_symlinks=False)
    os.chmod(mnt / "fifo", 0o600)
    with open(mnt / "h1", "ab") as f:  # one name of a lower hard link: index=off breaks it
        f.write(b"more\n")


@pytest.mark.parametrize("lowerfs", ["disk", "tmpfs"])
def test_a_copied_up_file_keeps_its_st_ino_over_a_remount(tmp_path, fuse, root, lowerfs):
    """Copy-up stores the lower object's file handle in `overlay.origin`, byte for byte as
    the kernel does (the filesystem's uuid included: tmpfs has one, this disk may not), and
    a later mount reads it back, from either's upper: st_ino stays the lower file's."""
    lo = tmp_path / "lo"
    lo.mkdir()
    with _tmpfs(*([lo] if lowerfs == "tmpfs" else [])):
        write(lo / "f", b"f\n")
        os.symlink("f", lo / "s")
        os.mkfifo(lo / "fifo")
        write(lo / "h1", b"h\n")
        os.link(lo / "h1", lo / "h2")
        names = ("f", "s", "fifo", "h1", "h2")
        ups = {}
        for engine in ("kernel", "layerfs"):
            up, wk, mnt = (tmp_path / engine / p for p in ("up", "wk", "mnt"))
            for p in (up, wk, mnt):
                p.mkdir(parents=True)
            ups[engine] = up
            if engine == "kernel":
                with KernelOverlay(mnt, [lo], up, wk):
                    _copy_ups(mnt)
                if _origin(up / "f") is None:
                    pytest.skip(f"{_fs_type(lo)} under {lo} gives no file handles: no origins")
                continue
            with LayerfsMount(mnt, [lo], up, wk):
                before = {n: os.lstat(mnt / n).st_ino for n in names}
                _copy_ups(mnt)
                during = {n: os.lstat(mnt / n).st_ino for n in names}
            with LayerfsMount(mnt, [lo], up, wk):
                after = {n: os.lstat(mnt / n).st_ino for n in names}
        # the broken link's copied name reports its own upper file, as on the kernel
        assert during == after == {**before, "h1": during["h1"]} and during["h1"] != before["h1"]
        for name in ("f", "s", "fifo", "h1"):
            ours, theirs = (_origin(ups[e] / name) for e in ("layerfs", "kernel"))
            assert ours == theirs, name
            assert (ours is None) == (name == "h1")  # none for a copy that breaks a link
        up, wk, mnt = ups["kernel"], tmp_path / "wk3", tmp_path / "mnt3"
        wk.mkdir()
        mnt.mkdir()
        with LayerfsMount(mnt, [lo], up, wk):  # the kernel's upper, read by layerfs
            assert {n: os.lstat(mnt / n).st_ino for n in ("f", "s", "fifo")} == {
                n: before[n] for n in ("f", "s", "fifo")
            }
        # index=on: the names of a hard link stay one inode, with the lower file's number,
        # and its copy gets an origin too, as the kernel gives the files it indexes
        for engine in ("layerfs", "kernel"):
            up, wk, mnt = (tmp_path / f"{engine}-index" / p for p in ("up", "wk", "mnt"))
            for p in (up, wk, mnt):
                p.mkdir(parents=True)
            ups[engine] = up
            mount = KernelOverlay if engine == "kernel" else LayerfsMount
            with mount(mnt, [lo], up, wk, "index=on"):
                linked = os.lstat(mnt / "h2").st_ino
                _copy_ups(mnt)
            if engine == "layerfs":
                with LayerfsMount(mnt, [lo], up, wk, "index=on"):
                    assert os.lstat(mnt / "h1").st_ino == os.lstat(mnt / "h2").st_ino == linked
        assert _origin(ups["layerfs"] / "h1") == _origin(ups["kernel"] / "h1") is not None


def _impure_lower(lo: Path) -> None:
    write(lo / "a/f", b"f\n")
    write(lo / "g", b"g\n")
    write(lo / "d/h", b"h\n")
    write(lo / "e/deep/k", b"k\n")
    write(lo / "e/x", b"x\n")


def _impure_steps(mnt: Path) -> None:
    """Copy-ups, and objects with an origin moved, exchanged and linked into directories
    new in the upper: each leaves an entry whose inode number is not its upper object's."""
    os.mkdir(mnt / "n")
    os.rename(mnt / "a/f", mnt / "n/f")  # a file: copied up, then moved
    os.rename(mnt / "g", mnt / "n/g")
    os.rename(mnt / "d", mnt / "n/d")  # a merged directory: redirected
    os.mkdir(mnt / "n2")
    (mnt / "n2/z").touch()
    os.link(mnt / "n/g", mnt / "n2/gl")
    os.mkdir(mnt / "n3")
    (mnt / "n3/y").touch()
    with open(mnt / "e/x", "ab") as f:  # copied up, then exchanged with a new file
        f.write(b"!")
    fsutil.renameat2(os.fsencode(mnt / "e/x"), os.fsencode(mnt / "n3/y"), fsutil.RENAME_EXCHANGE)
    with open(mnt / "e/deep/k", "ab") as f:  # and its directories with it
        f.write(b"!")


def _marked(up: Path, name: str) -> set[str]:
    found = set()
    for d, _dirs, files in os.walk(up):
        for path in [d, *(os.path.join(d, f) for f in files)]:
            with contextlib.suppress(OSError):
                os.getxattr(path, name, follow_symlinks=False)
                found.add(os.path.relpath(path, up))
    return found


def test_directories_that_hold_copied_up_objects_are_marked_impure(tmp_path, fuse, root):
    """A copy-up marks the upper directory it goes into `overlay.impure`, and so does moving
    or linking in an object with an origin; a copied-up directory gets an origin, as a file
    does.  The same directories as the kernel's: kernel overlayfs, mounting layerfs's upper,
    gives readdir's d_ino as st_ino there.  Before, it gave the upper's own numbers for
    `a`, `n/f`, `n/g`, `n/d` and `n2/gl` (`ls -i` against `stat`)."""
    ups, trees = {}, {}
    for engine in ("kernel", "layerfs"):
        lo, up, wk, mnt = (tmp_path / engine / p for p in ("lo", "up", "wk", "mnt"))
        for p in (up, wk, mnt):
            p.mkdir(parents=True)
        _impure_lower(lo)
        ups[engine] = up
        mount = KernelOverlay if engine == "kernel" else LayerfsMount
        with mount(mnt, [lo], up, wk, "redirect_dir=on"):
            _impure_steps(mnt)
            trees[engine] = treecmp.snapshot(mnt)
            assert treecmp.inode_problems(trees[engine]) == [], engine
    if not _marked(ups["kernel"], "trusted.overlay.origin"):
        pytest.skip(f"{_fs_type(tmp_path)} gives no file handles: no origins")
    assert treecmp.diff(trees["layerfs"], trees["kernel"], compare_mtime=False) == []
    impure = _marked(ups["kernel"], "trusted.overlay.impure")
    assert impure == {".", "a", "e", "e/deep", "n", "n2", "n3"}
    assert _marked(ups["layerfs"], "trusted.overlay.impure") == impure
    origins = _marked(ups["kernel"], "trusted.overlay.origin")
    assert {"a", "e", "e/deep", "n/d"} <= origins
    assert _marked(ups["layerfs"], "trusted.overlay.origin") == origins
    lo, up = tmp_path / "layerfs/lo", ups["layerfs"]
    kmnt, kwk = tmp_path / "kmnt", tmp_path / "kwk"
    kmnt.mkdir()
    kwk.mkdir()
    with KernelOverlay(kmnt, [lo], up, kwk, "redirect_dir=on"):
        seen = treecmp.snapshot(kmnt)
    assert treecmp.inode_problems(seen) == []
    assert treecmp.diff(trees["layerfs"], seen, compare_mtime=False) == []


_UUID_CASES = {  # name: (mount options, what the upper root holds before the mount)
    "new": ("", {}),
    "ro": ("ro", {}),
    "on": ("uuid=on", {}),
    "off": ("uuid=off", {}),
    "null": ("uuid=null", {}),
    "old": ("", {"impure": b"y"}),
    "old-on": ("uuid=on", {"impure": b"y"}),
    "kept": ("", {"uuid": b"\x01" * 16}),
    "odd": ("uuid=on", {"uuid": b"\x01\x02"}),
}


def _uuid_after(engine: str, base: Path, opts: str, before: dict[str, bytes]) -> dict[str, int]:
    lo, up, wk, mnt = (base / engine / p for p in ("lo", "up", "wk", "mnt"))
    for p in (lo, up, wk, mnt):
        p.mkdir(parents=True)
    for name, value in before.items():
        os.setxattr(up, f"trusted.overlay.{name}", value)
    mount = KernelOverlay if engine == "kernel" else LayerfsMount
    with mount(mnt, [lo], up, wk, opts):
        os.listdir(mnt)
    found = {n: os.getxattr(up, n) for n in os.listxattr(up) if n.startswith("trusted.overlay.")}
    if found.get("trusted.overlay.uuid") == before.get("uuid"):
        return {n: -1 if n == "trusted.overlay.uuid" else len(v) for n, v in found.items()}
    return {n: len(v) for n, v in found.items()}  # a new uuid: its length (it is random)


def test_the_upper_gets_a_persistent_uuid_as_on_the_kernel(tmp_path, fuse, root):
    """A writable mount of a new upper writes `overlay.uuid` (16 random bytes) on its root,
    as the kernel's uuid=auto does since Linux 6.6; an old upper (its root impure) gets none
    unless uuid=on; off and null write none; one already there is kept, whatever its size.
    Before, layerfs left every upper without it."""
    for case, (opts, before) in _UUID_CASES.items():
        base = tmp_path / case
        theirs = _uuid_after("kernel", base, opts, before)
        ours = _uuid_after("layerfs", base, opts, before)
        assert ours == theirs, case
    assert _uuid_after("layerfs", tmp_path / "x", "", {}) == {"trusted.overlay.uuid": 16}
    x = tmp_path / "x/layerfs"
    opts = overlay_options([x / "lo"], x / "up", x / "wk") + ",uuid=maybe"
    proc = subprocess.run(
        [LAYERFS, "-o", opts, str(x / "mnt")], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0 and "uuid=maybe" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("opts", ["redirect_dir=on", "redirect_dir=off"])
def test_a_directory_made_in_a_merged_one_is_opaque_as_on_the_kernel(tmp_path, fuse, root, opts):
    """With redirect_dir=on (or index=on, metacopy=on: lower layers may not change offline)
    the kernel marks a directory made new in a merged one opaque, "just an optimization";
    with none of them it does not.  layerfs marks the same ones."""
    marked = {}
    for engine in ("kernel", "layerfs"):
        lo, up, wk, mnt = (tmp_path / engine / p for p in ("lo", "up", "wk", "mnt"))
        for p in (up, wk, mnt):
            p.mkdir(parents=True)
        write(lo / "d/f", b"f\n")
        mount = KernelOverlay if engine == "kernel" else LayerfsMount
        with mount(mnt, [lo], up, wk, opts):
            for d in ("new", "d/new", "new/sub"):  # in the merged root and d; in a new one
                os.mkdir(mnt / d)
        marked[engine] = _marked(up, "trusted.overlay.opaque")
    assert marked["layerfs"] == marked["kernel"]
    assert marked["kernel"] == ({"new", "d/new"} if opts == "redirect_dir=on" else set())


def _over_whiteouts(mnt: Path) -> None:
    """Rename onto names whose lower objects were removed, then (files) move away again."""
    os.unlink(mnt / "a/f0")
    os.rename(mnt / "a/f1", mnt / "a/f0")  # onto f0's whiteout
    os.rename(mnt / "a/f0", mnt / "a/g")  # the lower f0 must stay hidden
    os.unlink(mnt / "a/f2")
    os.link(mnt / "a/g", mnt / "a/f2")  # link onto f2's whiteout, then rename the name away
    os.rename(mnt / "a/f2", mnt / "a/h")
    shutil.rmtree(mnt / "a/dd")
    os.mkdir(mnt / "a/nd")
    write(mnt / "a/nd/mine", b"mine\n")
    os.rename(mnt / "a/nd", mnt / "a/dd")  # onto the whiteout of a lower directory


def test_what_is_renamed_onto_a_whiteout_keeps_the_lower_object_hidden(tmp_path, fuse, root):
    """A rename onto a whited-out name replaced the whiteout without recording that a lower
    object lies below: renamed away again, the name got no whiteout, and a directory got
    no opaque mark.  The live mount looked right (the kernel's dentry cache); after a
    remount, or once the kernel dropped its caches, the removed lower file came back, and
    the removed directory's files reappeared inside the new one.  Found by a concurrent
    stress run compared with kernel overlayfs on the same upper."""
    trees = {}
    for engine in ("layerfs", "kernel"):
        lo, up, wk, mnt = (tmp_path / engine / p for p in ("lo", "up", "wk", "mnt"))
        for p in (up, wk, mnt):
            p.mkdir(parents=True)
        for name in ("f0", "f1", "f2"):
            write(lo / "a" / name, f"lower {name}\n".encode())
        write(lo / "a/dd/inner", b"removed with its directory\n")
        if engine == "kernel":
            with KernelOverlay(mnt, [lo], up, wk, "redirect_dir=on"):
                _over_whiteouts(mnt)
        else:
            with LayerfsMount(mnt, [lo], up, wk):
                _over_whiteouts(mnt)
        # what the upper means, read by the kernel after the mount
        check, wk2 = tmp_path / engine / "check", tmp_path / engine / "wk2"
        check.mkdir()
        wk2.mkdir()
        with KernelOverlay(check, [lo], up, wk2, "redirect_dir=on"):
            trees[engine] = treecmp.snapshot(check)
            assert sorted(os.listdir(check / "a")) == ["dd", "g", "h"], engine
            assert os.listdir(check / "a/dd") == ["mine"], engine
            assert (check / "a/g").read_bytes() == b"lower f1\n", engine
        with LayerfsMount(mnt, [lo], up, wk):  # and by layerfs, from scratch
            assert sorted(os.listdir(mnt / "a")) == ["dd", "g", "h"], engine
            assert os.listdir(mnt / "a/dd") == ["mine"], engine
    assert treecmp.diff(trees["layerfs"], trees["kernel"], compare_mtime=False) == []


def _on_both(
    tmp_path: Path, upper: Callable[[Path], None], steps: Callable[[Path], Any], extra: str = ""
) -> dict[str, Any]:
    """`steps` on a kernel overlay and on layerfs (with `extra`), each over an empty lower
    and an upper that `upper` filled; what each returned."""

    def layers(root: Path) -> tuple[Path, Path, Path, Path]:
        lo, up, wk, mnt = (root / p for p in ("lo", "up", "wk", "mnt"))
        for p in (lo, up, wk, mnt):
            p.mkdir(parents=True)
        upper(up)
        return lo, up, wk, mnt

    return mounts.on_both(tmp_path, layers, steps, extra)


def _hard_linked_names(mnt: Path) -> dict[str, object]:
    """Remove or rename over one name of hard-linked upper files while a file is open on it;
    the other names were never looked up in this mount (as after a remount)."""
    seen: dict[str, object] = {}
    fd = os.open(mnt / "d/x", os.O_WRONLY | os.O_APPEND)
    os.unlink(mnt / "d/x")
    seen["y before"] = os.stat(mnt / "d/y").st_size  # the first lookup of y
    os.write(fd, b"0123456789" * 100)
    os.close(fd)
    seen["y after"] = os.stat(mnt / "d/y").st_size
    seen["y data"] = (mnt / "d/y").read_bytes()
    fd = os.open(mnt / "d/a", os.O_WRONLY | os.O_APPEND)
    os.rename(mnt / "d/c", mnt / "d/a")
    seen["fstat"] = os.fstat(fd).st_size  # the file open, not what has its name now
    os.fchmod(fd, 0o600)
    os.write(fd, b"appended\n")
    os.close(fd)
    for name in ("a", "b"):
        st = os.stat(mnt / "d" / name)
        seen[name] = (oct(st.st_mode), (mnt / "d" / name).read_bytes())
    return seen


@pytest.mark.parametrize("extra", ["", "writeback=1,passthrough=0,fuse=native"])
def test_a_removed_name_of_a_hard_linked_file_leaves_one_file(tmp_path, fuse, root, extra):
    """layerfs marked a node whose name went as gone whenever it knew no other name, though
    the upper file had other links: a lookup of one of them then made a second node for the
    same file, whose cached size and data went stale as the first was written through (`y`
    read 2 bytes where the file had 1,002); and a name renamed over left the node naming
    what replaced it, so fstat, fchmod and O_APPEND on the still-open file acted on that
    file or at its size (zeros written into the open file)."""

    def upper(up: Path) -> None:
        write(up / "d/x", b"x\n")
        os.link(up / "d/x", up / "d/y")
        write(up / "d/a", b"hello\n")
        os.link(up / "d/a", up / "d/b")
        write(up / "d/c", b"other file\n")
        os.chmod(up / "d/a", 0o644)
        os.chmod(up / "d/c", 0o644)

    results = _on_both(tmp_path, upper, _hard_linked_names, extra)
    kernel = results["kernel"]
    assert kernel["y after"] == 1002 and kernel["fstat"] == 6
    assert kernel["b"] == ("0o100600", b"hello\nappended\n")
    assert kernel["a"] == ("0o100644", b"other file\n")
    assert results["layerfs"] == kernel


def _forgotten_parent(mnt: Path) -> list[object]:
    """Reach a hard-linked file by two names, keep it open by one, let the kernel forget the
    other name's directory, then rename that directory and ask about the open file."""
    os.stat(mnt / "d1/u")
    os.stat(mnt / "d2/v")  # the file's latest name: the one layerfs resolved it by
    fd = os.open(mnt / "d1/u", os.O_RDWR)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # d2/v and d2 are unused: the kernel forgets d2 (d1/u stays open)
        time.sleep(0.5)  # FORGET travels on its own
        os.rename(mnt / "d2", mnt / "d3")  # a new lookup of d2, then the rename
        os.setxattr(fd, "user.k", b"1")
        return [sorted(os.listxattr(fd)), os.fstat(fd).st_nlink, os.pread(fd, 100, 0)]
    finally:
        os.close(fd)


def test_a_file_whose_name_lives_under_a_forgotten_directory(tmp_path, fuse, root):
    """A node reached by two names kept the directory of its last-resolved name as its parent
    after the kernel forgot that directory; a new lookup made a second node for it, so its
    rename left the first one's path stale and requests on the open file failed (ENOENT),
    seen by a stress run with index=on.  One node object per directory number now, while
    anything refers to it."""

    def upper(up: Path) -> None:
        write(up / "d1/u", b"linked\n")
        (up / "d2").mkdir()
        os.link(up / "d1/u", up / "d2/v")

    results = _on_both(tmp_path, upper, _forgotten_parent)
    assert results["kernel"] == [["user.k"], 2, b"linked\n"]
    assert results["layerfs"] == results["kernel"]


_CACHESTAT = 451  # cachestat(2), Linux 6.5; one number on every architecture


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recent")]


def _page_cache(path: Path, length: int) -> _Cachestat:
    """How many of the first `length` bytes' pages are cached, dirty, under writeback."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, out = _Range(0, length), _Cachestat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
            err = ctypes.get_errno()
            mounts.need(False, f"cachestat(2): {os.strerror(err)}")
        return out
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ["kernel", "layerfs", "layerfs-volatile"])
def test_copied_up_data_is_on_disk_before_it_goes_into_place(tmp_path, fuse, root, engine):
    """Kernel overlayfs fsyncs a copied-up file's data before it renames the file into the
    upper (ovl_copy_up_file), unless the mount is `volatile`.  Without that, a power cut
    can leave the renamed upper file empty or zero-filled (delayed allocation): it hides the
    lower file, whose bytes the user then loses by appending one byte.  Seen here as the
    upper copy's page cache: no page of the copied bytes is still dirty once the append that
    copied it up returns.  The volatile case shows the check can see dirty pages."""
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the upper must be on a disk filesystem: tmpfs has no writeback")
    size = 1 << 20  # whole pages: the appended byte dirties only the page after them
    lo, up, wk, mnt = tmp_path / "lo", tmp_path / "up", tmp_path / "wk", tmp_path / "mnt"
    for p in (up, wk, mnt):
        p.mkdir()
    write(lo / "f", os.urandom(size))
    if engine == "kernel":
        ctx: object = KernelOverlay(mnt, [lo], up, wk)
    else:
        extra = "volatile" if engine == "layerfs-volatile" else ""
        ctx = LayerfsMount(mnt, [lo], up, wk, extra_opts=extra)
    with ctx:  # type: ignore[attr-defined]
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"!")
        finally:
            os.close(fd)
        cache = _page_cache(up / "f", size)
    # a filesystem that shares the copied extents (XFS, btrfs: copy_file_range clones) has
    # nothing to write back; CI's ext4 must show the pages (mounts.need fails there)
    mounts.need(cache.cache > 0, "the copy-up left nothing in the page cache to check (reflink)")
    if engine == "layerfs-volatile":
        assert cache.dirty > 0, "volatile: the copy is not synced, as on the kernel"
    else:
        assert (cache.dirty, cache.writeback) == (0, 0), f"{engine}: copied data not on disk"
    assert (up / "f").stat().st_size == size + 1


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mountpoint above it)."""
    best = ("", "")
    for mp, fstype in mounts.mounts():
        if (str(path) + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best[0]):
            best = (mp, fstype)
    return best[1]


def _removed_dirs_still_open(mnt: Path) -> list[tuple[str, object]]:
    """fstat, a listing and stat(".") of directories removed while open or a cwd: an upper
    one removed by rmdir or renamed over, a lower one removed (xfstests generic/035)."""
    out: list[tuple[str, object]] = []
    for how in ("rmdir", "renamed over", "lower", "cwd"):
        d = mnt / ("lowerdir" if how == "lower" else how.replace(" ", "-"))
        if how != "lower":
            d.mkdir()
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if how == "renamed over":
                (mnt / "src").mkdir()
                os.rename(mnt / "src", d)
            else:
                os.rmdir(d)
            st = value_or_errno(lambda fd=fd: os.fstat(fd))
            out.append((how, st if isinstance(st, str) else (st.st_mode, st.st_nlink)))
            out.append((how, value_or_errno(lambda fd=fd: os.listdir(fd))))
            os.fchdir(fd)
            try:
                out.append((how, value_or_errno(lambda: os.stat(".").st_nlink)))
            finally:
                os.chdir("/")
        finally:
            os.close(fd)
    return out


def test_a_removed_directory_still_open_stats_as_on_the_kernel(tmp_path, fuse, root):
    def lower_dir(root_: Path) -> tuple[Path, Path, Path, Path]:
        lo, up, wk, mnt = (root_ / p for p in ("lo", "up", "wk", "mnt"))
        for p in (lo / "lowerdir", up, wk, mnt):
            p.mkdir(parents=True)
        return lo, up, wk, mnt

    results = mounts.on_both(tmp_path, lower_dir, _removed_dirs_still_open)
    assert ("rmdir", (0o40755, 0)) in results["kernel"]  # the oracle
    assert results["layerfs"] == results["kernel"]


def _rename_whiteout(mnt: Path) -> tuple[object, list[str]]:
    (mnt / "a").write_bytes(b"a")
    a, b = os.fsencode(mnt / "a"), os.fsencode(mnt / "b")
    done = value_or_errno(lambda: fsutil.renameat2(a, b, fsutil.RENAME_WHITEOUT))
    return done, sorted(os.listdir(mnt))


def test_rename_whiteout_is_refused_as_by_the_kernel(tmp_path, fuse, root):
    """renameat2(RENAME_WHITEOUT) is EINVAL on kernel overlayfs; layerfs took it for a
    plain rename and left no whiteout (xfstests generic/078)."""
    results = _on_both(tmp_path, lambda up: None, _rename_whiteout)
    assert results["kernel"] == ("EINVAL", ["a"])  # the oracle
    assert results["layerfs"] == results["kernel"]


def _copy_file_ranges(mnt: Path) -> list[tuple[str, object]]:
    """copy_file_range(2) from a lower file into a new one at other offsets, and into files
    opened for writing before `chattr +i` / `+a` (xfstests generic/553)."""
    out: list[tuple[str, object]] = []
    fin = os.open(mnt / "src", os.O_RDONLY)
    try:
        fo = os.open(mnt / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
        out.append(("copied", value_or_errno(lambda: os.copy_file_range(fin, fo, 1 << 20, 10, 5))))
        os.close(fo)
        data = (mnt / "dst").read_bytes()
        out.append(("dst", (len(data), data[:5], data[5:] == (mnt / "src").read_bytes()[10:])))
        for name, flag, oflags in (("imm", "+i", 0), ("app", "+a", os.O_APPEND)):
            fo = os.open(mnt / name, os.O_WRONLY | os.O_CREAT | oflags, 0o644)
            try:
                os.write(fo, b"x" * 100)
                subprocess.run(["chattr", flag, str(mnt / name)], check=True)
                out.append(
                    (name, value_or_errno(lambda fo=fo: os.copy_file_range(fin, fo, 50, 0, 0)))
                )
                subprocess.run(["chattr", "-" + flag[1], str(mnt / name)], check=True)
            finally:
                os.close(fo)
            out.append((name, (mnt / name).stat().st_size))
    finally:
        os.close(fin)
    return out


def test_copy_file_range_as_on_the_kernel(tmp_path, fuse, root):
    """layerfs answers COPY_FILE_RANGE itself (on the real files), so a target whose flags
    forbid writing refuses it, as kernel overlayfs's inode makes the VFS refuse it."""

    def lower_file(root_: Path) -> tuple[Path, Path, Path, Path]:
        lo, up, wk, mnt = (root_ / p for p in ("lo", "up", "wk", "mnt"))
        for p in (lo, up, wk, mnt):
            p.mkdir(parents=True)
        (lo / "src").write_bytes(bytes(range(256)) * 300)
        return lo, up, wk, mnt

    results = mounts.on_both(tmp_path, lower_file, _copy_file_ranges)
    assert ("imm", "EPERM") in results["kernel"]  # the oracle
    assert results["layerfs"] == results["kernel"]


def _age(where: Path, names: tuple[str, ...] = ("f", "d")) -> None:
    """Mark `names` under `where` read long ago (atime 1000, so that relatime would update
    them); their mtimes stay."""
    for name in names:
        os.utime(where / name, (1000, os.stat(where / name).st_mtime))


def _atimes_after_reading(mnt: Path) -> dict[str, bool]:
    """Whether reading marks the atime (set far back, so relatime updates it): an upper
    file read, an upper directory listed, a lower file read and a lower directory listed,
    which never change (xfstests generic/003; the lower directory's did, until session 41)."""
    (mnt / "f").write_bytes(b"upper\n")
    (mnt / "d").mkdir()
    _age(mnt)
    (mnt / "f").read_bytes()
    os.listdir(mnt / "d")
    (mnt / "lf").read_bytes()
    os.listdir(mnt / "ld")
    (mnt / "ld" / "deeper").exists()  # a lookup in it
    marked = {name: os.stat(mnt / name).st_atime > 1000 for name in ("f", "d")}
    lower = mnt.parent / "lo"  # the real ones: the mount may show what it cached
    return marked | {name: os.stat(lower / name).st_atime > 1000 for name in ("lf", "ld")}


def test_reading_marks_atime_as_on_the_kernel(tmp_path, fuse, root):
    def lower_file(root_: Path) -> tuple[Path, Path, Path, Path]:
        lo, up, wk, mnt = (root_ / p for p in ("lo", "up", "wk", "mnt"))
        for p in (lo, up, wk, mnt):
            p.mkdir(parents=True)
        (lo / "lf").write_bytes(b"lower\n")
        (lo / "ld").mkdir()
        (lo / "ld" / "x").touch()
        _age(lo, ("lf", "ld"))
        return lo, up, wk, mnt

    results = mounts.on_both(tmp_path, lower_file, _atimes_after_reading)
    assert results["kernel"] == {"f": True, "d": True, "lf": False, "ld": False}  # the oracle
    assert results["layerfs"] == results["kernel"]


def _remount(mnt: Path, flags: str) -> None:
    """`mount -o remount,FLAGS`: the kernel's own for overlayfs, the layerfs helper for a
    layerfs mount (as mount(8) runs it), a bind remount (per-mount flags) with `bind`."""
    args = ["mount", "-o", f"remount,{flags}", str(mnt)]
    if not flags.startswith("bind,") and mounts.fstype(str(mnt)) != "overlay":
        args = [LAYERFS, "layerfs", str(mnt), "-o", f"remount,{flags}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _read_marks(up: Path, mnt: Path) -> tuple[bool, bool]:
    """Read the upper file `f` and list the upper directory `d`: which got a new atime."""
    (mnt / "f").read_bytes()
    os.listdir(mnt / "d")
    return (os.stat(up / "f").st_atime > 1000, os.stat(up / "d").st_atime > 1000)


def test_the_mounts_atime_flags_keep_upper_atimes_as_on_the_kernel(tmp_path, fuse, root):
    """A read through a mount made `ro`, `noatime` or `nodiratime` (at the mount, or by a
    remount later, also a bind remount's per-mount flags) marks no atime in the upper, as
    kernel overlayfs applies its own mount's flags; layerfs's reads marked them under the
    upper filesystem's relatime whatever the mount said (xfstests generic/003).  The atimes
    are set back through the mount (the kernel's inode keeps its own), before it otherwise."""
    results: dict[str, dict[str, tuple[bool, bool]]] = {}
    for engine in ("kernel", "layerfs"):
        for how in ("", "ro", "noatime", "nodiratime", "remount"):
            base = tmp_path / engine / (how or "plain")
            lo, up, wk, mnt = (base / p for p in ("lo", "up", "wk", "mnt"))
            for p in (lo, up, wk, mnt):
                p.mkdir(parents=True)
            (up / "f").write_bytes(b"upper\n")
            (up / "d").mkdir()
            (up / "d" / "x").touch()
            _age(up)
            opts = how if how != "remount" else ""
            mount: KernelOverlay | LayerfsMount
            if engine == "kernel":
                mount = KernelOverlay(mnt, [lo], up, wk, extra_opts=opts)
            else:
                mount = LayerfsMount(mnt, [lo], up, wk, extra_opts=opts)
            with mount:
                seen = results.setdefault(engine, {})
                seen[how or "plain"] = _read_marks(up, mnt)
                if how == "remount":
                    for flags in ("noatime", "atime,relatime", "nodiratime", "bind,ro"):
                        _age(mnt)
                        _remount(mnt, flags)
                        seen[f"remount,{flags}"] = _read_marks(up, mnt)
    assert results["kernel"] == {  # the oracle
        "plain": (True, True), "ro": (False, False), "noatime": (False, False),
        "nodiratime": (True, False), "remount": (True, True),
        "remount,noatime": (False, False), "remount,atime,relatime": (True, True),
        "remount,nodiratime": (True, False), "remount,bind,ro": (False, False),
    }  # fmt: skip
    assert results["layerfs"] == results["kernel"]


def _numbers(mnt: Path) -> dict[str, Any]:
    names = [".", "f", "f2", "g", "up", "uf", "d/sub", "top"]
    out: dict[str, Any] = {n: os.lstat(mnt / n).st_ino for n in names}
    with open(mnt / "g", "ab") as f:  # a copy-up keeps the lower file's number
        f.write(b"more\n")
    with open(mnt / "f", "ab") as f:  # a copy-up that breaks a hard link (index=off)
        f.write(b"more\n")
    (mnt / "new").mkdir()
    (mnt / "d/nf").write_bytes(b"")
    for n in ("g", "f", "f2", "new", "d/nf"):
        out[f"after {n}"] = os.lstat(mnt / n).st_ino
    out["d_ino"] = {e.name: e.inode() for e in os.scandir(mnt) if e.name not in ("d", "new")}
    out["d_ino ."] = next(e.inode() for e in os.scandir(mnt / "d") if e.name == "nf")
    return out


def test_numbers_are_the_real_ones_with_every_layer_on_one_filesystem(tmp_path, fuse, root):
    """The kernel's numbers there (no xino): a file's own, a copy-up's its lower file's, the
    root the topmost layer root's.  Each engine gets its own copy of the layers, so the
    real numbers of that copy are the expected ones.  (A merged directory's number is its
    bottom layer's on layerfs, the topmost lower's on the kernel: a documented difference,
    left out here.)"""
    got = {}
    for engine in ("kernel", "layerfs"):
        d = tmp_path / engine
        l1, l2, up, wk, mnt = (d / n for n in ("l1", "l2", "u", "w", "m"))
        for p in (l1 / "d", l2 / "d/sub", l1 / "top", up / "up", wk, mnt):
            p.mkdir(parents=True)
        write(l2 / "f", b"a\n")
        os.link(l2 / "f", l2 / "f2")
        write(l1 / "g", b"b\n")
        write(up / "uf", b"u\n")
        cls = KernelOverlay if engine == "kernel" else LayerfsMount
        with cls(mnt, [l1, l2], up, wk):
            seen = _numbers(mnt)
        real = {n: os.lstat(p).st_ino for n, p in {
            ".": up, "f": l2 / "f", "g": l1 / "g", "up": up / "up", "uf": up / "uf",
            "d/sub": l2 / "d/sub", "top": l1 / "top", "after f": up / "f",
            "after new": up / "new", "after d/nf": up / "d/nf"}.items()}  # fmt: skip
        # each engine's numbers as the names of that copy's real objects
        names = {v: k for k, v in real.items()}

        def named(v: Any, names: dict[int, str] = names) -> Any:
            return (
                {n: names.get(i, i) for n, i in v.items()}
                if isinstance(v, dict)
                else names.get(v, v)
            )

        got[engine] = {k: named(v) for k, v in seen.items()}
    assert got["kernel"]["f"] == "f" and got["kernel"]["after g"] == "g"  # the oracle
    assert got["kernel"]["."] == "." and got["kernel"]["after f"] == "after f"
    assert got["layerfs"] == got["kernel"]

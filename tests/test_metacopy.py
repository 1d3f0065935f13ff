"""An upper where kernel overlayfs, mounted with metacopy=on, copied files up by their
metadata only (`trusted.overlay.metacopy`: the upper file's bytes are a hole of the right
size, the data is still in the lower layer).  Without metacopy=on the kernel refuses such a
file (EPERM, "refusing to follow metacopy origin"), and so does layerfs; with metacopy=on
both read its data from below, and a change copies the data up first.  layerfs showed them
as zeros, and an append went onto the zeros; a commit stored the zeros (it now refuses
them).  (podman sets metacopy=on in its storage.conf on some distributions, so a container's
upper can hold such files.)

layerfs with metacopy=on makes them too, where the kernel does: a change of metadata (chmod,
chown, utimes, xattrs, chattr, rename, link) copies a regular file up without its data, with
the kernel's redirects for a moved or linked one; its first change of data copies the data.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from imagestore.changeset import ChangesetError, write_changeset
from tests import treecmp
from tests.mounts import LAYERFS, KernelOverlay, LayerfsMount, overlay_options
from tests.ops import value_or_errno

pytestmark = pytest.mark.mount


def _kernel_metacopy_upper(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    (lower / "d").mkdir(parents=True)
    (lower / "f").write_bytes(b"lower data\n")
    (lower / "d/g").write_bytes(b"deep data\n")
    (lower / "plain").write_bytes(b"plain\n")
    opts = overlay_options([lower], upper, work) + ",metacopy=on,redirect_dir=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        os.chmod(mnt / "f", 0o600)  # metadata only: a metacopy upper file
        os.rename(mnt / "d/g", mnt / "g2")  # and one with a redirect to its data
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert "trusted.overlay.metacopy" in os.listxattr(upper / "f")
    return lower, upper, work, mnt


def _seen(mnt: Path) -> dict[str, object]:
    return {
        "listing": sorted(os.listdir(mnt)),
        "stat f": value_or_errno(lambda: os.stat(mnt / "f").st_size),
        "read f": value_or_errno(lambda: (mnt / "f").read_bytes()),
        "append f": value_or_errno(lambda: open(mnt / "f", "ab").close()),
        "read g2": value_or_errno(lambda: (mnt / "g2").read_bytes()),
        "plain": (mnt / "plain").read_bytes(),
        "d": sorted(os.listdir(mnt / "d")),
    }


def test_metacopy_files_are_refused_as_by_the_kernel(tmp_path, fuse, root):
    lower, upper, work, mnt = _kernel_metacopy_upper(tmp_path)
    with KernelOverlay(mnt, [lower], upper, work):  # metacopy=off, the default
        want = _seen(mnt)
    assert want["read f"] == "EPERM" and want["plain"] == b"plain\n"  # the oracle
    with LayerfsMount(mnt, [lower], upper, work):
        got = _seen(mnt)
    assert got == want
    # nothing was written to the metadata-only copies: the kernel reads them as before
    with KernelOverlay(mnt, [lower], upper, work, extra_opts="metacopy=on,redirect_dir=on"):
        assert (mnt / "f").read_bytes() == b"lower data\n"
        assert (mnt / "g2").read_bytes() == b"deep data\n"


METACOPY_ON = "metacopy=on,redirect_dir=on"


def _with_metacopy(mnt: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    st = os.stat(mnt / "g2")
    seen["read"] = ((mnt / "f").read_bytes(), (mnt / "g2").read_bytes())
    seen["sizes"] = (os.stat(mnt / "f").st_size, st.st_size, st.st_blocks > 0)
    with open(mnt / "f", "ab") as f:  # the data is copied up first
        f.write(b"appended\n")
    os.rename(mnt / "g2", mnt / "g3")
    after = os.stat(mnt / "g3")
    seen["renamed"] = ((mnt / "g3").read_bytes(), after.st_mtime_ns == st.st_mtime_ns)
    seen["appended"] = (mnt / "f").read_bytes()
    seen["listing"] = sorted(os.listdir(mnt))
    return seen


def test_metacopy_on_reads_and_fills_as_the_kernel(tmp_path, fuse, root):
    klo, kup, kwk, kmnt = _kernel_metacopy_upper(tmp_path / "kernel")
    lo, up, wk, mnt = _kernel_metacopy_upper(tmp_path / "layerfs")
    with KernelOverlay(kmnt, [klo], kup, kwk, extra_opts=METACOPY_ON):
        want = _with_metacopy(kmnt)
    assert want["read"] == (b"lower data\n", b"deep data\n")  # the oracle
    with LayerfsMount(mnt, [lo], up, wk, extra_opts=METACOPY_ON):
        got = _with_metacopy(mnt)
    assert got == want
    assert "trusted.overlay.metacopy" not in os.listxattr(up / "f")  # filled
    with KernelOverlay(mnt, [lo], up, wk, extra_opts=METACOPY_ON):  # the kernel reads it so
        assert (mnt / "f").read_bytes() == b"lower data\nappended\n"
        assert (mnt / "g3").read_bytes() == b"deep data\n"


def test_metacopy_on_in_a_lower_layer_as_the_kernel(tmp_path, fuse, root):
    """The kernel's upper, stacked as a lower layer below a new upper (unionmount-testsuite's
    `--ov=N`): its metacopy files read, and copy up, their data from the layer below."""
    seen = {}
    for side in ("kernel", "layerfs"):
        lower, old_upper, _, mnt = _kernel_metacopy_upper(tmp_path / side)
        upper, work = tmp_path / side / "upper2", tmp_path / side / "work2"
        upper.mkdir()
        work.mkdir()
        layers = [old_upper, lower]
        mount = KernelOverlay if side == "kernel" else LayerfsMount
        with mount(mnt, layers, upper, work, extra_opts=METACOPY_ON):
            seen[side] = _with_metacopy(mnt)
        with KernelOverlay(mnt, layers, upper, work, extra_opts=METACOPY_ON):
            seen[side]["remounted"] = ((mnt / "f").read_bytes(), (mnt / "g3").read_bytes())
    assert seen["kernel"]["read"] == (b"lower data\n", b"deep data\n")  # the oracle
    assert seen["layerfs"] == seen["kernel"]


def test_metacopy_on_needs_redirects(tmp_path, fuse):
    lower, upper, work, mnt = _kernel_metacopy_upper(tmp_path)
    r = subprocess.run(
        [LAYERFS, "-o", overlay_options([lower], upper, work) + ",metacopy=on,redirect_dir=off",
         str(mnt)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "conflicting options" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _tar_files(upper: Path, lowers: list[Path]) -> dict[str, bytes]:
    buf = io.BytesIO()
    write_changeset(upper, lowers, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_commit_takes_a_metacopy_files_data_from_below(tmp_path, root):
    """A commit stores a metacopy file's bytes, read where its data is (here: the same
    name, and a redirect), never the hole the upper holds."""
    lower, upper, _, _ = _kernel_metacopy_upper(tmp_path)
    files = _tar_files(upper, [lower])
    assert files["f"] == b"lower data\n" and files["g2"] == b"deep data\n"


def test_commit_follows_metacopy_files_through_an_old_upper(tmp_path, fuse, root):
    """The kernel's upper stacked below a new one, whose metadata changes copy its
    metacopy files up again: their data is two layers down."""
    lower, old_upper, _, mnt = _kernel_metacopy_upper(tmp_path)
    upper, work = tmp_path / "upper2", tmp_path / "work2"
    upper.mkdir()
    work.mkdir()
    with KernelOverlay(mnt, [old_upper, lower], upper, work, extra_opts=METACOPY_ON):
        os.chmod(mnt / "f", 0o640)
        os.rename(mnt / "g2", mnt / "g3")
    assert "trusted.overlay.metacopy" in os.listxattr(upper / "g3")  # the oracle
    files = _tar_files(upper, [lower, old_upper])
    assert files["f"] == b"lower data\n" and files["g3"] == b"deep data\n"
    # and layerfs reads them so, all three layers as lower ones (it read old_upper's hole)
    with LayerfsMount(mnt, [upper, old_upper, lower], extra_opts="metacopy=on"):
        assert (mnt / "f").read_bytes() == b"lower data\n"
        assert (mnt / "g3").read_bytes() == b"deep data\n"


def test_commit_refuses_a_metacopy_file_without_data(tmp_path, root):
    lower, upper, _, _ = _kernel_metacopy_upper(tmp_path)
    os.unlink(lower / "f")  # a lower layer that lost the data: nothing to commit it from
    with pytest.raises(ChangesetError, match="'/f': a metacopy file .* in no lower layer"):
        write_changeset(upper, [lower], io.BytesIO())


def _metacopy_lower(lower: Path) -> None:
    rnd = random.Random(1)
    for name in "abcdeghiklmnopqz":
        (lower / name).parent.mkdir(parents=True, exist_ok=True)
        (lower / name).write_bytes(rnd.randbytes(10_000))
    (lower / "empty").write_bytes(b"")
    (lower / "sub/deep").mkdir(parents=True)
    (lower / "sub/f").write_bytes(rnd.randbytes(5_000))
    (lower / "sub/deep/f2").write_bytes(rnd.randbytes(5_000))
    (lower / "dd").mkdir()
    (lower / "dd/x").write_bytes(rnd.randbytes(3_000))
    os.link(lower / "a", lower / "hl1")  # a hard-linked one (index=off)
    os.chmod(lower / "g", 0o4755)


def _metadata_changes(mnt: Path) -> dict[str, object]:
    """Every way a file is copied up by its metadata (or not) on the kernel with
    metacopy=on; returns what readers saw on the way."""
    seen: dict[str, object] = {}
    with open(mnt / "b", "rb") as early:  # open on the lower file before its copy-up
        os.chmod(mnt / "a", 0o600)
        os.chown(mnt / "b", 1, 1)
        seen["early reader"] = early.read(16)
    os.utime(mnt / "c", (1000, 1000))
    os.setxattr(mnt / "d", "user.x", b"1")
    os.rename(mnt / "e", mnt / "e2")  # a relative redirect
    os.rename(mnt / "hl1", mnt / "hl2")  # absolute: the lower file has other links
    os.rename(mnt / "sub/f", mnt / "f3")  # an absolute one
    os.rename(mnt / "sub/deep", mnt / "deep2")
    os.link(mnt / "h", mnt / "sub/hlink")  # a link: an absolute redirect on the inode
    os.chmod(mnt / "empty", 0o600)
    os.chown(mnt / "g", 5, 5)  # clears setuid
    os.close(os.open(mnt / "i", os.O_RDWR))  # opened for writing: the data too
    before = os.stat(mnt / "l").st_mtime_ns
    os.chmod(mnt / "l", 0o600)
    os.close(os.open(mnt / "l", os.O_WRONLY | os.O_APPEND))  # its data, nothing written:
    seen["l mtime moved"] = os.stat(mnt / "l").st_mtime_ns != before  # the copy's time
    os.chmod(mnt / "k", 0o640)
    with open(mnt / "k", "ab") as f:  # then its data, at the first write
        f.write(b"more")
    os.rename(mnt / "m", mnt / "m2")
    os.rename(mnt / "m2", mnt / "m3")  # a relative redirect kept
    os.rename(mnt / "n", mnt / "n2")
    os.rename(mnt / "n2", mnt / "dd/n3")  # made absolute on leaving the directory
    os.chmod(mnt / "dd/x", 0o600)
    os.rename(mnt / "dd", mnt / "dd2")  # its data found through the directory's redirect
    os.setxattr(mnt / "o", "user.y", b"2")
    os.removexattr(mnt / "o", "user.y")
    os.truncate(mnt / "p", 20_000)  # a change of size: the data too
    os.chmod(mnt / "q", 0o600)
    os.rename(mnt / "q", mnt / "deep2/q2")
    os.rename(mnt / "z", mnt / "sub/z")
    os.rename(mnt / "sub/z", mnt / "z3")
    fd = os.open(mnt / "deep2/f2", os.O_RDONLY)
    try:
        os.fchmod(fd, 0o611)  # through a reader of the lower file: the copy changes
    finally:
        os.close(fd)
    return seen


def _upper_files(upper: Path) -> dict[str, tuple[object, ...]]:
    """Each upper file: mode, size, whether its data is there (SEEK_DATA), and its
    overlay.metacopy and overlay.redirect."""
    out = {}
    for path, obj in treecmp.snapshot(upper).items():
        if obj.kind != "file":
            continue
        fd = os.open(upper / os.fsdecode(path.lstrip(b"/")), os.O_RDONLY)
        try:
            has_data = os.lseek(fd, 0, os.SEEK_DATA) >= 0
        except OSError:
            has_data = False
        finally:
            os.close(fd)
        out[os.fsdecode(path)] = (
            oct(obj.mode), obj.size, has_data,
            obj.xattrs.get(b"trusted.overlay.metacopy"),
            obj.xattrs.get(b"trusted.overlay.redirect"),
        )  # fmt: skip
    return out


def test_metacopy_on_copies_up_metadata_only_as_the_kernel(tmp_path, fuse, root):
    seen, views, uppers = {}, {}, {}
    for side in ("kernel", "layerfs"):
        lower, upper, work, mnt = (tmp_path / side / n for n in ("lower", "upper", "work", "mnt"))
        for p in (lower, upper, work, mnt):
            p.mkdir(parents=True)
        _metacopy_lower(lower)
        before = treecmp.snapshot(lower)
        mount = KernelOverlay if side == "kernel" else LayerfsMount
        with mount(mnt, [lower], upper, work, extra_opts=METACOPY_ON):
            seen[side] = _metadata_changes(mnt)
            views[side] = treecmp.snapshot(mnt)
        uppers[side] = _upper_files(upper)
        assert treecmp.diff(treecmp.snapshot(lower), before) == []  # lowers never change
    want = uppers["kernel"]
    # the oracle: metadata only, with the kernel's redirects; data where it was needed
    assert want["/a"] == ("0o600", 10_000, False, b"", None)
    assert want["/e2"][3:] == (b"", b"e") and want["/m3"][3:] == (b"", b"m")
    assert want["/hl2"][3:] == (b"", b"/hl1")
    assert want["/f3"][3:] == (b"", b"/sub/f") and want["/dd2/n3"][3:] == (b"", b"/n")
    assert want["/sub/hlink"][3:] == (b"", b"/h") and want["/g"][0] == "0o755"
    assert want["/i"][2:] == (True, None, None) and want["/k"][2:] == (True, None, None)
    assert uppers["layerfs"] == want
    assert seen["layerfs"] == seen["kernel"]
    assert treecmp.diff(views["layerfs"], views["kernel"], compare_mtime=False) == []
    # layerfs's upper, mounted again by the kernel and by layerfs, reads as it did
    lower, upper = tmp_path / "layerfs/lower", tmp_path / "layerfs/upper"
    for mount in (KernelOverlay, LayerfsMount):
        work = tmp_path / f"work-{mount.__name__}"
        work.mkdir()
        with mount(tmp_path / "layerfs/mnt", [lower], upper, work, extra_opts=METACOPY_ON):
            again = treecmp.snapshot(tmp_path / "layerfs/mnt")
        assert treecmp.diff(views["layerfs"], again, compare_mtime=False) == [], mount
    # and a commit of it holds every file's bytes as the mount showed them
    files = _tar_files(upper, [lower])
    for name, data in files.items():
        if "/.wh." in "/" + name:
            continue
        assert hashlib.sha256(data).hexdigest() == views["layerfs"][b"/" + name.encode()].content
    assert {"a", "e2", "f3", "h", "dd2/x", "deep2/f2"} <= set(files)


def test_a_metadata_only_copy_the_kernel_forgot_still_reads_its_data(tmp_path, fuse, root):
    """A file copied up by its metadata only, whose inode the kernel then forgot and looked
    up again, read as zeros (the hole of its upper file): the new node looked for its data
    from the path its listing entry still held, the lower file's, which is no metacopy
    file.  Found by the differential test (metacopy=on), as a chattr then a read."""
    views = {}
    for side in ("kernel", "layerfs"):
        lower, upper, work, mnt = (tmp_path / side / n for n in ("lower", "upper", "work", "mnt"))
        for p in (lower, upper, work, mnt):
            p.mkdir(parents=True)
        _metacopy_lower(lower)
        mount = KernelOverlay if side == "kernel" else LayerfsMount
        with mount(mnt, [lower], upper, work, extra_opts=METACOPY_ON):
            _metadata_changes(mnt)
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")  # the kernel forgets them
            time.sleep(0.5)  # FORGET travels on its own
            views[side] = treecmp.snapshot(mnt)
    assert (
        views["kernel"][b"/a"].content
        == hashlib.sha256((tmp_path / "kernel/lower/a").read_bytes()).hexdigest()
    )
    assert treecmp.diff(views["layerfs"], views["kernel"], compare_mtime=False) == []


def test_metacopy_off_copies_whole(tmp_path, fuse, root):
    """Without metacopy=on (the default) every copy-up carries the data, as the kernel's."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    _metacopy_lower(lower)
    with LayerfsMount(mnt, [lower], upper, work):
        _metadata_changes(mnt)
    files = _upper_files(upper)
    assert files["/a"] == ("0o600", 10_000, True, None, None)
    assert [f for f, v in files.items() if v[3] is not None or v[4] is not None] == []


def test_filling_a_metacopy_file_keeps_its_capabilities_as_the_kernel(tmp_path, fuse, root):
    """A `chmod` copies a file with capabilities up by its metadata; an open for writing
    then copies its data into the upper file, and writing a file drops its capabilities
    (the VFS's killpriv).  The kernel keeps them and sets them back after the data
    (ovl_copy_up_meta_inode_data); layerfs lost them (xfstests overlay/064)."""
    caps = b"\x01\x00\x00\x02\x80\x00\x00\x00" + bytes(12)  # cap_setuid+ep
    seen = {}
    for who, mount in (("layerfs", LayerfsMount), ("kernel", KernelOverlay)):
        d = tmp_path / who
        for sub in ("lower", "upper", "work", "mnt"):
            (d / sub).mkdir(parents=True)
        for name in ("f", "g"):
            (d / "lower" / name).write_bytes(b"data\n")
            os.setxattr(d / "lower" / name, "security.capability", caps)
        with mount(d / "mnt", [d / "lower"], d / "upper", d / "work", "metacopy=on"):
            os.chmod(d / "mnt/f", 0o755)  # metadata only
            os.close(os.open(d / "mnt/f", os.O_RDWR))  # now the data
            os.chmod(d / "mnt/g", 0o755)
            with open(d / "mnt/g", "ab") as f:
                f.write(b"more\n")  # the data, then a write through the mount
            seen[who] = {
                n: (
                    value_or_errno(os.getxattr, d / "mnt" / n, "security.capability"),
                    (d / "mnt" / n).read_bytes(),
                )
                for n in ("f", "g")
            }
        seen[who]["upper"] = {
            n: sorted(x for x in os.listxattr(d / "upper" / n) if "metacopy" in x)
            for n in ("f", "g")
        }
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"]["f"] == (caps, b"data\n")
    assert seen["layerfs"]["upper"] == {"f": [], "g": []}

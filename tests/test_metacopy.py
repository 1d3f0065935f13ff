"""An upper where kernel overlayfs, mounted with metacopy=on, copied files up by their
metadata only (`trusted.overlay.metacopy`: the upper file's bytes are a hole of the right
size, the data is still in the lower layer).  Without metacopy=on the kernel refuses such a
file (EPERM, "refusing to follow metacopy origin"), and so does layerfs; with metacopy=on
both read its data from below, and a change copies the data up first.  layerfs showed them
as zeros, and an append went onto the zeros; a commit stored the zeros (it now refuses
them).  (podman sets metacopy=on in its storage.conf on some distributions, so a container's
upper can hold such files.)
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from imagestore.changeset import ChangesetError, write_changeset
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


def test_commit_refuses_a_metacopy_file(tmp_path, root):
    lower, upper, _, _ = _kernel_metacopy_upper(tmp_path)
    with pytest.raises(ChangesetError, match="'/f': a metacopy file"):
        write_changeset(upper, [lower], io.BytesIO())

"""An upper where kernel overlayfs, mounted with metacopy=on, copied files up by their
metadata only (`trusted.overlay.metacopy`: the upper file's bytes are a hole of the right
size, the data is still in the lower layer).  The kernel without metacopy=on refuses such a
file (EPERM, "refusing to follow metacopy origin") and so does layerfs, which does not offer
metacopy=on.  layerfs showed them, reading zeros, and an append went onto the zeros; a commit
stored the zeros.  (podman sets metacopy=on in its storage.conf on some distributions, so a
container's upper can hold such files.)
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
from pathlib import Path

import pytest

from imagestore.changeset import ChangesetError, write_changeset
from tests.mounts import KernelOverlay, LayerfsMount, overlay_options

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


def _err(fn) -> object:
    try:
        return fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]


def _seen(mnt: Path) -> dict[str, object]:
    return {
        "listing": sorted(os.listdir(mnt)),
        "stat f": _err(lambda: os.stat(mnt / "f").st_size),
        "read f": _err(lambda: (mnt / "f").read_bytes()),
        "append f": _err(lambda: open(mnt / "f", "ab").close()),
        "read g2": _err(lambda: (mnt / "g2").read_bytes()),
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


def test_commit_refuses_a_metacopy_file(tmp_path, root):
    lower, upper, _, _ = _kernel_metacopy_upper(tmp_path)
    with pytest.raises(ChangesetError, match="'/f': a metacopy file"):
        write_changeset(upper, [lower], io.BytesIO())

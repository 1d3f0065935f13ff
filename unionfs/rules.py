"""The union rules of kernel overlayfs as pure decisions: what a marker means, in one place.

Two walkers apply them, each in its own shape: `stack.LayerStack` merges whole directories
for the daemon (and `commit --verify`'s model), `imagestore.changeset` looks names up one at a
time to find what an upper changed.  Neither decides on its own whether an entry is a
whiteout, whether a directory is opaque or where a redirect leads: both ask here, so the two
cannot drift apart.  markers.py knows the encodings (bytes and xattr names); this module
knows the rules that use them (Documentation/filesystems/overlayfs.rst):
  - lookup goes top-down; a whiteout or a non-directory ends it, directories merge until the
    first opaque one;
  - OCI markers (`.wh.NAME`, `.wh..wh..opq`) count in lower layers only: the upper is
    written in the kernel's format, and a user's own file named `.wh.x` there is a file;
  - an xattr whiteout counts only inside a directory marked `overlay.opaque=x`;
  - an opaque directory's redirect is not followed; a redirect is a path from the root of
    the lower stack when absolute, else a name in the parent's lower part; the kernel may
    store it with a trailing NUL, which is not part of the path.
The kernel oracle tests (tests/test_oracle.py, tests/test_kernel_parity.py) check these
against the kernel itself.  Pure functions over a `fsat.Roots`; no state.
"""

from __future__ import annotations

import os

from . import markers
from .fsat import PLAIN, Roots


def oci_markers_count(layer: int, has_upper: bool) -> bool:
    """Whether OCI `.wh.` files are markers in `layer` (0 is the upper when there is one)."""
    return not (has_upper and layer == 0)


def hidden_by_oci_file(name: bytes) -> bytes | None:
    """The name an OCI whiteout file hides (`.wh.foo` → `foo`); None for other names and
    for the opaque marker (ask only where `oci_markers_count`)."""
    return markers.oci_whiteout_target(name)


def is_whiteout(path: bytes, st: os.stat_result, xwhiteouts: bool, fs: Roots = PLAIN) -> bool:
    """Whether the entry at `path` (`st` its lstat) is a kernel-format whiteout: a character
    device 0/0, or, in a directory whose marks say `xwhiteouts`, a zero-size file carrying
    `overlay.whiteout`."""
    if markers.is_chardev_whiteout(st):
        return True
    return xwhiteouts and markers.is_xattr_whiteout(path, st, fs)


def is_opaque(path: bytes, marks: markers.DirMarks, oci: bool, fs: Roots = PLAIN) -> bool:
    """Whether directory `path` hides what lies below it: its opaque xattr, or (where OCI
    markers count) a `.wh..wh..opq` file inside."""
    return marks.opaque or (oci and fs.exists(markers.oci_opaque_path(path)))


def redirect_of(marks: markers.DirMarks) -> bytes | None:
    """The redirect to follow for a directory with these marks, without the kernel's
    trailing NUL; None when it has none, or when it is opaque (nothing below to find)."""
    if marks.redirect is None or marks.opaque:
        return None
    return clean_redirect(marks.redirect)


def clean_redirect(value: bytes) -> bytes:
    """A stored `overlay.redirect` value as a path (the kernel may add a trailing NUL)."""
    return value.rstrip(b"\0")


def redirect_path(redirect: bytes, parent_origin: bytes) -> bytes:
    """Where a redirected directory's lower part lives, from the root of the lower stack:
    an absolute redirect as is, a relative one (a name) inside its parent's lower part."""
    if redirect.startswith(b"/"):
        return redirect
    return parent_origin.rstrip(b"/") + b"/" + redirect

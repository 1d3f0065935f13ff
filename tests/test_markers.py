"""markers.py writes what it reads: whiteouts, opaque and redirect xattrs, the OCI names."""

import os

import pytest

from unionfs import markers


def test_oci_names():
    assert markers.oci_whiteout_name(b"foo") == b".wh.foo"
    assert markers.oci_whiteout_path(b"a/b/foo") == b"a/b/.wh.foo"
    assert markers.oci_whiteout_path(b"foo") == b".wh.foo"
    assert markers.oci_opaque_path(b"a/b") == b"a/b/.wh..wh..opq"
    assert markers.oci_whiteout_target(markers.oci_whiteout_name(b"x")) == b"x"


def test_written_markers_read_back(tmp_path):
    base = os.fsencode(tmp_path)
    try:
        markers.make_whiteout(base + b"/gone")
    except PermissionError:
        pytest.skip("mknod of 0/0 refused here (Linux < 5.8 without root)")
    assert markers.is_chardev_whiteout(os.lstat(base + b"/gone"))
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        markers.make_whiteout_at(fd, b"also")
    finally:
        os.close(fd)
    assert markers.is_chardev_whiteout(os.lstat(base + b"/also"))
    os.mkdir(base + b"/d")
    os.mkdir(base + b"/m")
    try:
        markers.set_opaque(base + b"/d")
        markers.set_redirect(base + b"/m", b"/old/place")
    except OSError as exc:
        pytest.skip(f"this filesystem refuses the marker xattrs: {exc}")
    assert markers.dir_marks(base + b"/d").opaque
    marks = markers.dir_marks(base + b"/m")
    assert not marks.opaque and marks.redirect == b"/old/place"

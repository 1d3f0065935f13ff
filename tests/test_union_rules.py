"""unionfs.rules: the marker decisions LayerStack and the changeset share (pure, no mount)."""

import os

from unionfs import markers, rules


def test_redirects_opaque_wins_and_the_kernels_nul_is_not_part_of_the_path():
    assert rules.redirect_of(markers.DirMarks(False, False, b"/a/b\0")) == b"/a/b"
    assert rules.redirect_of(markers.DirMarks(True, False, b"/a/b")) is None
    assert rules.redirect_of(markers.DirMarks(False, False, None)) is None
    assert rules.redirect_path(b"/abs/x", b"/p") == b"/abs/x"
    assert rules.redirect_path(b"old", b"/p/q") == b"/p/q/old"
    assert rules.redirect_path(b"old", b"/") == b"/old"


def test_oci_markers_count_in_lower_layers_only():
    assert not rules.oci_markers_count(0, has_upper=True)
    assert rules.oci_markers_count(0, has_upper=False)
    assert rules.oci_markers_count(1, has_upper=True)
    assert rules.hidden_by_oci_file(b".wh.x") == b"x"
    assert rules.hidden_by_oci_file(markers.WH_OPAQUE) is None


def test_opaque_by_xattr_or_by_oci_file(tmp_path):
    d = os.fsencode(tmp_path)
    plain = markers.DirMarks(False, False)
    assert not rules.is_opaque(d, plain, oci=True)
    (tmp_path / ".wh..wh..opq").write_bytes(b"")
    assert rules.is_opaque(d, plain, oci=True)
    assert not rules.is_opaque(d, plain, oci=False)  # in the upper it is a user's file
    assert rules.is_opaque(d, markers.DirMarks(True, False), oci=False)


def test_a_regular_file_is_not_a_whiteout_outside_xwhiteout_dirs(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    st = os.lstat(f)
    assert not rules.is_whiteout(os.fsencode(f), st, xwhiteouts=False)
    assert not rules.is_whiteout(os.fsencode(f), st, xwhiteouts=True)  # no overlay.whiteout

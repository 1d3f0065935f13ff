"""tarapply's PLAIN format (commit --verify's applier): layers onto one plain directory."""

import io
import os
import tarfile

import pytest

from imagestore import tarapply, tarsafe
from imagestore.tarapply import LayerWriter


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _apply(root, data: bytes, fmt: str) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    w = LayerWriter(fd, fmt)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|", tarinfo=tarsafe.SafeTarInfo) as t:
            for m in t:
                w.apply(m, t)
        w.finish()
    finally:
        w.close()
        os.close(fd)


def _tree(root) -> dict[str, bytes | None]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_whiteouts_delete_and_opaque_clears_lower_content_only(tmp_path):
    _apply(
        tmp_path,
        _tar(
            [
                ("a", None),
                ("a/x", b"1"),
                ("a/y", b"2"),
                ("b", b"3"),
                ("d", None),
                ("d/sub", None),
                ("d/sub/f", b"4"),
            ]
        ),
        tarapply.PLAIN,
    )
    _apply(
        tmp_path,
        _tar(
            [
                ("a", None),
                ("a/new", b"5"),
                ("a/.wh..wh..opq", b""),
                (".wh.b", b""),
                (".wh.d", b""),
                ("c", b"6"),
                (".wh.c", b""),
            ]
        ),
        tarapply.PLAIN,
    )
    # a: opaque, so lower x and y are gone, this layer's `new` stays (in either order);
    # b and d: whited out; c: a whiteout of this layer's own entry leaves it
    assert _tree(tmp_path) == {"a": None, "a/new": b"5", "c": b"6"}


def test_a_directory_replacing_a_file_is_plain(tmp_path):
    _apply(tmp_path, _tar([("p", b"file")]), tarapply.PLAIN)
    _apply(tmp_path, _tar([("p", None), ("p/q", b"x")]), tarapply.PLAIN)
    assert _tree(tmp_path) == {"p": None, "p/q": b"x"}
    assert os.listxattr(tmp_path / "p") == []  # no opaque marker in a plain directory


def test_the_overlay_format_marks_instead(tmp_path):
    _apply(tmp_path, _tar([("a", None), (".wh.b", b""), ("a/.wh..wh..opq", b"")]), tarapply.OVERLAY)
    names = sorted(os.listdir(tmp_path))
    assert "b" in names or ".wh.b" in names  # a 0/0 device, or the .wh. file fallback
    with pytest.raises(ValueError):
        LayerWriter(0, "squashfs")

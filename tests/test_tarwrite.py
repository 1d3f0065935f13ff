"""tarwrite against tarfile: the same archive bytes for every member list.

The oracle is `tarfile.open(mode="w", format=PAX_FORMAT, encoding="utf-8",
errors="surrogateescape")` with `addfile`, as `changeset.write_changeset` wrote layers before
tarwrite.  Members come from hypothesis over the fields tarwrite's fast header decides on (name
and link lengths around 100, ASCII or not, surrogate escapes, numbers at their octal limits,
floats, every type, PAX records, owner names) and from a changeset of a real upper, compared
member by member with tarfile's rewrite of what it wrote.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagestore import changeset
from imagestore.tarwrite import TarWriter, header

SETTINGS = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "150")) * 4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE]  # fmt: skip
_text = st.one_of(
    st.text(st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=110),
    st.text(max_size=40).map(lambda s: s.replace("\0", "")),
    st.builds(lambda a, b: a + b, st.text("ab/", min_size=95, max_size=105), st.sampled_from(
        ["", "/", "é", "\udcff", "x"]
    )),
)  # fmt: skip
_small = st.one_of(st.integers(0, 8**7 + 2), st.sampled_from([8**7 - 1, 8**7]))
_large = st.one_of(
    st.integers(0, 8**11 + 2),
    st.sampled_from([8**11 - 1, 8**11]),
    st.floats(0, 2e9, allow_nan=False),
)


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(draw(_text))
    info.type = draw(st.sampled_from(TYPES))
    info.mode = draw(st.integers(0, 0o177777))
    info.uid, info.gid = draw(_small), draw(_small)
    info.mtime = draw(_large)
    info.uname = draw(st.sampled_from(["", "root", "x" * 32, "x" * 33, "é"]))
    info.gname = draw(st.sampled_from(["", "staff"]))
    if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = draw(_text)
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20))
    if draw(st.booleans()):
        info.pax_headers = draw(
            st.dictionaries(st.sampled_from(["SCHILY.xattr.user.a", "comment"]), _text, max_size=2)
        )
    data = None
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
        data = draw(st.binary(max_size=1500))
        info.size = len(data)
    return info, data


def _tarfile_bytes(items: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
        errors="surrogateescape",
    ) as tar:  # fmt: skip
        for info, data in items:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return out.getvalue()


def _ours(items: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    tar = TarWriter(out)
    for info, data in items:
        tar.add(info, None if data is None else io.BytesIO(data).read)
    tar.close()
    assert tar.offset == len(out.getvalue())
    return out.getvalue()


@SETTINGS
@given(st.lists(members(), max_size=6))
def test_the_same_archive_as_tarfile(items):
    try:
        expected = _tarfile_bytes(items)
    except (ValueError, UnicodeError) as exc:  # a member tarfile cannot write
        with pytest.raises(type(exc)):
            _ours(items)
        return
    assert _ours(items) == expected


@SETTINGS
@given(members())
def test_every_header_as_tarfiles(item):
    info, _ = item
    try:
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except (ValueError, UnicodeError) as exc:
        with pytest.raises(type(exc)):
            header(info)
        return
    assert header(info) == expected


def test_the_checksum_at_its_largest():
    """Every byte of a header tarwrite builds itself as large as it gets: its checksum (a
    byte sum, taken with adler32 modulo 65521) is still exact."""
    info = tarfile.TarInfo("\x7f" * 100)
    info.type, info.linkname = tarfile.SYMTYPE, "\x7f" * 100
    info.uname = info.gname = "\x7f" * 32
    info.mode, info.uid, info.gid, info.mtime = 0o7777, 8**7 - 1, 8**7 - 1, 8**11 - 1
    assert header(info) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
@pytest.mark.parametrize("length", [99, 100, 101])
def test_names_at_the_header_fields_width(kind, length):
    """100 bytes fit the name field, 101 need a PAX record; a directory's name gets its "/"
    first (99 + "/" fits, 100 + "/" does not); the same for a link's target."""
    info = tarfile.TarInfo("n" * length)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.name, info.linkname = "s", "t" * length
    assert header(info) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@pytest.mark.parametrize("size", [0, 5, 512, 1000, (1 << 20) + 3])
def test_data_that_comes_in_pieces(size):
    """A reader that hands out at most 7 bytes a call (as a pipe may) still makes the same
    archive, whether the member is written in one piece or several."""
    info = tarfile.TarInfo("f")
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    info.size = size
    src = io.BytesIO(data)
    out = io.BytesIO()
    tar = TarWriter(out)
    tar.add(info, lambda n: src.read(min(n, 7)))
    tar.close()
    assert out.getvalue() == _tarfile_bytes([(info, data)])


def test_short_data_is_an_error_as_with_tarfile():
    info = tarfile.TarInfo("f")
    info.size = 10
    with pytest.raises(OSError, match="unexpected end of data"):
        TarWriter(io.BytesIO()).add(info, io.BytesIO(b"12345").read)


def test_a_changeset_is_what_tarfile_writes_of_its_members(tmp_path):
    """A real upper (files, a long name, a non-UTF-8 name, an xattr, a symlink, hard links,
    a whiteout, an opaque directory) over a lower: tarfile, given the members and data our
    tar holds, writes the same bytes."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "gone").write_text("x")
    (lower / "o").mkdir()
    (lower / "o" / "old").write_text("x")
    (upper / "d").mkdir(parents=True)
    os.mknod(upper / "d" / "gone", 0o600 | 0o020000, 0)  # a whiteout: char device 0/0
    (upper / "o").mkdir()
    os.setxattr(upper / "o", "trusted.overlay.opaque", b"y")
    (upper / "o" / "new").write_bytes(b"n" * 700)
    (upper / ("l" * 120)).write_bytes(b"long")
    (upper / os.fsdecode(b"\xffname")).write_bytes(b"raw")
    (upper / "x").write_bytes(b"xattr")
    os.setxattr(upper / "x", "user.k", b"v")
    (upper / "s").symlink_to("x")
    os.link(upper / "x", upper / "hard")
    out = io.BytesIO()
    changeset.write_changeset(upper, [lower], out)
    ours = out.getvalue()
    with tarfile.open(fileobj=io.BytesIO(ours), encoding="utf-8", errors="surrogateescape") as t:
        items = []
        for m in t.getmembers():
            f = t.extractfile(m) if m.isreg() else None
            m.pax_headers.pop("hdrcharset", None)  # as read; tarfile adds it again itself
            items.append((m, f.read() if f else None))
    names = [m.name for m, _ in items]
    assert "d/.wh.gone" in names and "o/.wh..wh..opq" in names and "l" * 120 in names
    assert _tarfile_bytes(items) == ours

"""tarstream against tarfile: the same members, data, end offset and errors, for every tar.

The oracle is the loop `unpack._apply_all` ran before tarstream (tarfile in stream mode with
tarsafe.SafeTarInfo, its error messages), kept here as `_through_tarfile`.  Both readers read
from a source that counts what it hands out, so they must also have read the same bytes of
the stream when they finish or fail (decompression errors surface at the same point).
Tars: Python tarfile in USTAR, GNU and PAX formats, GNU tar (`--format=gnu|oldgnu|pax|ustar|v7`,
long names, links, devices, fifos, xattrs, sparse files), hand-made headers tarfile treats
specially, truncations and byte flips of all of them, and hypothesis garbage.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagestore import tarapply, tarsafe, tarstream, unpack
from imagestore.errors import CorruptLayer
from imagestore.tarapply import LayerWriter
from tests.layertar import D, F, H, S, entry, make_tar

ATTRS = (
    "name", "linkname", "size", "mode", "uid", "gid", "mtime", "type", "devmajor",
    "devminor", "pax_headers", "uname", "gname", "sparse", "offset", "offset_data", "chksum",
)  # fmt: skip
SETTINGS = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _Source:
    """The uncompressed stream, counting the bytes it hands out."""

    def __init__(self, data) -> None:  # bytes, or a reader (a gzip stream, unpack's stream)
        self._f = io.BytesIO(data) if isinstance(data, bytes) else data
        self.given = 0

    def read(self, n: int) -> bytes:
        try:
            chunk = self._f.read(n)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise CorruptLayer(f"corrupt or truncated gzip stream: {exc}") from exc
        self.given += len(chunk)
        return chunk


def _take(member: tarfile.TarInfo, source, policy: str) -> tuple:
    """A member's attributes and the data the policy reads (all, none, or a first piece, as
    an applier that skips an entry or stops early)."""
    attrs = tuple(getattr(member, a) for a in ATTRS)
    if policy == "none" or not member.isreg():
        return attrs, None
    f = source.extractfile(member)
    if policy == "some":
        return attrs, f.read(700)
    chunks = []
    while chunk := f.read(1 << 20):
        chunks.append(chunk)
    return attrs, b"".join(chunks)


def _old_apply_all(src: _Source, each) -> int:
    """unpack._apply_all as it was before tarstream (tarfile), calling `each(member, tar)`
    where it applied the member; returns where the entries end."""
    try:
        tar = tarfile.open(
            fileobj=src, mode="r|", tarinfo=tarsafe.SafeTarInfo, bufsize=unpack.TAR_BUFSIZE
        )
    except tarstream.TAR_ERRORS as exc:
        if src.given == 0:
            return 0  # an empty stream is an empty layer
        raise CorruptLayer(f"not a tar archive: {exc}") from exc
    count = 0
    while True:
        try:
            member = tar.next()
        except tarstream.TAR_ERRORS as exc:
            raise CorruptLayer(f"bad tar header after {count} entries: {exc}") from exc
        if member is None:
            return tar.offset
        tar.members.clear()
        count += 1
        each(member, tar)


def _through_tarfile(src: _Source, policy: str) -> list:
    out: list = []
    end = _old_apply_all(src, lambda member, tar: out.append(_take(member, tar, policy)))
    return [*out, ("end", end)]


def _through_tarstream(src: _Source, policy: str, fast: list) -> list:
    reader = tarstream.TarReader(src, unpack.TAR_BUFSIZE)
    out: list = []
    try:
        while (member := reader.next()) is not None:
            out.append(_take(member, reader, policy))
    finally:
        fast.append(reader.fast)
    return [*out, ("end", reader.end)]


def _outcome(fn, data, policy: str, *extra) -> tuple:
    src = _Source(data() if callable(data) else data)
    try:
        result: object = fn(src, policy, *extra)
    except Exception as exc:  # the type and the message are what is compared
        result = (type(exc).__name__, str(exc))
    return result, src.given


def same(data, policy: str = "all") -> int:
    """Assert both readers agree on `data` (bytes, or a callable making a fresh stream);
    returns how many members tarstream parsed itself."""
    fast: list[int] = []
    theirs = _outcome(_through_tarfile, data, policy)
    ours = _outcome(_through_tarstream, data, policy, fast)
    assert ours == theirs
    return fast[0]


# ----- tars made with Python's tarfile -----------------------------------------------------
def _python_tar(fmt: int) -> bytes:
    long = "d" * 60 + "/" + "e" * 70 + "/" + "f" * 90  # > 100 bytes: prefix, L, or path
    entries = [
        D("etc", mode=0o755, uid=0, gid=0),
        F("etc/empty"),
        F("etc/one", b"x"),
        F("etc/block", b"b" * 512),
        F("etc/block+1", os.urandom(513)),
        F("etc/big", os.urandom(100_000), uid=1000, gid=1000, uname="u", gname="g"),
        F(long, b"long name"),
        D(long.rsplit("/", 1)[0] + "/sub"),
        S("etc/link", "../" + "t" * 40),
        H("etc/hard", "etc/one"),
        entry("etc/fifo", tarfile.FIFOTYPE),
        entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        F("etc/old", b"o", mtime=0, mode=0o4755),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries += [
            S("etc/longlink", "/" + "t" * 150),
            H("etc/longhard", long),
            F("etc/" + "n" * 200, b"one long component"),
            F("etc/bigid", b"i", uid=3_000_000, gid=2**30),
            F("etc/ünïcode-ß", b"u"),
        ]
    if fmt == tarfile.PAX_FORMAT:
        entries += [
            F("etc/xattr", b"x", xattrs={"user.a": "1", "security.capability": "\x01\x02"}),
            F("etc/times", b"t", pax={"mtime": "1.5", "atime": "2.25", "ctime": "3"}),
            F("etc/odd", b"o", pax={"comment": "a=b\nc", "size": "1", "uid": "x", "mtime": ""}),
            F("etc/dir-path", b"d", pax={"path": "etc/renamed///", "linkpath": "l"}),
            F("etc/named", b"n", pax={"uname": "ünï", "gname": "gr"}),
        ]
    if fmt != tarfile.USTAR_FORMAT:  # last: in PAX it comes with hdrcharset=BINARY
        entries.append(F(os.fsdecode(b"etc/latin1-\xe9"), b"bytes that are not UTF-8"))
    return make_tar(*entries, fmt=fmt)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("policy", ["all", "none", "some"])
def test_python_tars(fmt, policy):
    data = _python_tar(fmt)
    total = len(list(tarfile.open(fileobj=io.BytesIO(data))))
    # all on the fast path, but a PAX name that is not UTF-8 (hdrcharset: tarfile's)
    assert same(data, policy) == total - (fmt == tarfile.PAX_FORMAT)


def test_global_pax_header_goes_to_tarfile():
    globals_ = tarfile.TarInfo.create_pax_global_header({"comment": "global", "uid": "7"})
    data = _file("before", b"1") + globals_ + _file("after", b"2") + END
    assert same(data) == 1  # the member before the 'g' header; the rest is tarfile's


# ----- tars made with GNU tar ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gnu_tree(tmp_path_factory) -> Path:
    if shutil.which("tar") is None:
        pytest.fail("GNU tar is needed")
    root = tmp_path_factory.mktemp("gnu") / "tree"
    (root / "dir" / ("l" * 120)).mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"hello\n" * 1000)
    (root / "dir" / ("l" * 120) / ("m" * 150)).write_bytes(b"deep")
    os.symlink("../" + "s" * 120, root / "dir" / "symlink")
    os.link(root / "dir" / "file", root / "dir" / "hardlink")
    os.mkfifo(root / "dir" / "fifo")
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"data in the middle")
        f.truncate(8 << 20)
    os.setxattr(root / "dir" / "file", "user.note", b"v\n=1")
    if os.geteuid() == 0:
        os.mknod(root / "dir" / "null", 0o20666, os.makedev(1, 3))
        os.mknod(root / "dir" / "sda", 0o60660, os.makedev(8, 0))
        os.chown(root / "dir" / "file", 1234, 5678)
    return root


GNU_TARS = {
    "gnu": ["--format=gnu"],
    "oldgnu": ["--format=oldgnu"],
    "pax": ["--format=pax"],
    "pax-xattrs": ["--format=pax", "--xattrs", "--xattrs-include=*"],
    "ustar": ["--format=ustar"],
    "v7": ["--format=v7"],
    "gnu-sparse": ["--format=gnu", "--sparse"],
    "pax-sparse-0.0": ["--format=pax", "--sparse", "--sparse-version=0.0"],
    "pax-sparse-0.1": ["--format=pax", "--sparse", "--sparse-version=0.1"],
    "pax-sparse-1.0": ["--format=pax", "--sparse", "--sparse-version=1.0"],
}


def _gnu_tar(tree: Path, args: list[str]) -> bytes:
    # ustar and v7 refuse what they cannot store (exit 2) and write the rest
    got = subprocess.run(
        ["tar", "-C", str(tree), "-c", *args, "-f", "-", "."], capture_output=True, check=False
    )
    assert got.returncode in (0, 2), got.stderr
    return got.stdout


@pytest.mark.parametrize("name", list(GNU_TARS))
def test_gnu_tars(gnu_tree, name):
    data = _gnu_tar(gnu_tree, GNU_TARS[name])
    fast = same(data)
    total = len(list(tarfile.open(fileobj=io.BytesIO(data))))
    if "sparse" not in name:
        assert fast == total  # the whole layer on the fast path
    else:
        assert 0 < fast < total  # tarfile took over at the sparse member
    for policy in ("none", "some"):
        same(data, policy)


@pytest.mark.parametrize("name", ["gnu", "pax-xattrs", "pax-sparse-1.0"])
def test_truncated_and_flipped(gnu_tree, name):
    """Every cut and a byte flip in each header field of the first blocks."""
    data = _gnu_tar(gnu_tree, GNU_TARS[name])
    for cut in sorted({*range(0, 4096, 97), *range(0, len(data), 4099), len(data) - 600}):
        same(data[:cut])
    for pos in range(0, 3 * 512, 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x41
        same(bytes(flipped))


# ----- hand-made headers ---------------------------------------------------------------------
def _header(name: str = "f", kind: bytes = b"0", size: int = 0, **fields: bytes) -> bytes:
    """A ustar header block with raw fields; the checksum is computed unless given."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    where = {"mode": 100, "uid": 108, "gid": 116, "sizefield": 124, "mtime": 136,
             "chksum": 148, "linkname": 157, "magic": 257, "uname": 265, "devmajor": 329,
             "prefix": 345}  # fmt: skip
    for key, raw in fields.items():
        block[where[key] : where[key] + len(raw)] = raw
    if "chksum" not in fields:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(block))[0]  # type: ignore[attr-defined]
    return bytes(block)


def _pax(records: bytes, kind: bytes = b"x") -> bytes:
    return _header("PaxHeaders/f", kind, len(records)) + records + bytes(-len(records) % 512)


def _file(name: str = "f", data: bytes = b"", **fields: bytes) -> bytes:
    return _header(name, b"0", len(data), **fields) + data + bytes(-len(data) % 512)


END = bytes(1024)
PLAIN = _file("a", b"first")
CASES = {
    "empty": b"",
    "only-end": END,
    "short-end": bytes(300),
    "garbage": b"not a tar" * 100,
    "zero-length-record": PLAIN + _pax(b"0 path=x\n") + _file() + END,
    "zero-length-record-first": _pax(b"0 path=x\n") + _file() + END,
    "hdrcharset": PLAIN + _pax(b"21 hdrcharset=BINARY\n" + b"15 path=\xe9\xe9.x\n") + _file() + END,
    "hdrcharset-in-value": PLAIN + _pax(b"30 comment=1 hdrcharset=ab\n\n") + _file() + END,
    "gnu-sparse-key": PLAIN + _pax(b"28 GNU.sparse.realsize=100\n") + _file() + END,
    "gnu-sparse-other-key": PLAIN + _pax(b"25 GNU.sparse.minor=123\n") + _file() + END,
    "record-too-long": PLAIN + _pax(b"99 path=x\n") + _file() + END,
    "record-too-short": PLAIN + _pax(b"5 path=xyz\n12 uid=7\n") + _file() + END,
    "record-no-equals": PLAIN + _pax(b"9 pathx\n") + _file() + END,
    "record-huge-length": PLAIN + _pax(b"9" * 5000 + b" a=b\n") + _file() + END,
    "record-trailing-garbage": PLAIN + _pax(b"11 uid=42\nzz") + _file() + END,
    # framed by its length, but not ending in a newline: Python releases differ (3.11.7 takes
    # it, 3.11.10 and Debian 12's 3.11.2 do not); the fast path leaves it to tarfile
    "record-without-newline": PLAIN + _pax(b"10 uid=42K") + _file() + END,
    # each record's length counts itself, its digits and its newline included (POSIX)
    "record-not-utf8": PLAIN + _pax(b"11 path=\xff\xfe\n12 uname=\xe9t\n") + _file() + END,
    "record-size": PLAIN
    + _pax(b"10 size=3\n")
    + _header("d", b"5", 0)
    + b"abc".ljust(512, b"\0")
    + END,
    "record-size-negative": PLAIN + _pax(b"11 size=-9\n") + _file("g", b"x") + END,
    "record-size-on-link": PLAIN + _pax(b"11 size=20\n") + _header("h", b"1") + _file() + END,
    "global": PLAIN + _pax(b"11 uid=42\n", b"g") + _file() + END,
    "solaris": PLAIN + _pax(b"11 uid=42\n", b"X") + _file() + END,
    "unknown-type": PLAIN + _header("v", b"V", 3) + b"abc".ljust(512, b"\0") + END,
    "contiguous-type": PLAIN + _header("c", b"7", 3) + b"abc".ljust(512, b"\0") + END,
    "v7-dir": PLAIN + _header("v7dir///", b"\0") + END,
    "prefix": PLAIN + _header("name", b"0", prefix=b"some/prefix") + END,
    "prefix-dir": PLAIN + _header("", b"5", prefix=b"pre/dir/") + END,
    "bad-checksum": PLAIN + _header("f", chksum=b"0000000\0") + END,
    "bad-checksum-first": _header("f", chksum=b"0000000\0") + END,
    "signed-checksum": PLAIN
    + _header("\xe9", chksum=b"%06o\0 " % tarfile.calc_chksums(_header("\xe9"))[1])
    + END,  # type: ignore[attr-defined]
    "bad-number": PLAIN + _header("f", uid=b"12x4567\0") + END,
    "octal-prefix-number": PLAIN + _header("f", uid=b"0o17\0\0\0\0") + END,
    "spaces-number": PLAIN + _header("f", uid=b"  17   \0") + END,
    "base256-size": PLAIN
    + _header("f", b"0", 0, sizefield=b"\x80" + bytes(10) + b"\x03")
    + b"abc".ljust(512, b"\0")
    + END,
    "base256-negative-size": PLAIN + _header("f", b"0", 0, sizefield=b"\xff" * 12) + END,
    "bad-number-in-pax-header": PLAIN
    + _pax(b"11 uid=42\n")[:512].replace(b"0000644", b"00006x4")
    + END,
    "pax-then-end": PLAIN + _pax(b"11 uid=42\n") + END,
    "long-then-end": PLAIN + _header("././@LongLink", b"L", 5) + b"abcde".ljust(512, b"\0") + END,
    "long-name-dir": PLAIN
    + _header("././@LongLink", b"L", 8)
    + b"a/dir///".ljust(512, b"\0")
    + _header("x", b"5")
    + END,
    "long-link-then-pax": PLAIN
    + _header("././@LongLink", b"K", 3)
    + b"tgt".ljust(512, b"\0")
    + _pax(b"13 path=p/q/\n")
    + _header("s", b"2")
    + END,
    "pax-then-long": PLAIN
    + _pax(b"13 path=p/q/\n")
    + _header("././@LongLink", b"L", 3)
    + b"abc".ljust(512, b"\0")
    + _header("x", b"5")
    + END,
    "chain-of-5": PLAIN + _pax(b"11 uid=42\n") * 5 + _file() + END,
    "chain-of-17": PLAIN + _pax(b"11 uid=42\n") * 17 + _file() + END,
    "oversized-pax": PLAIN + _header("PaxHeaders/f", b"x", tarsafe.MAX_HEADER_SIZE + 1) + END,
    "gnu-sparse-type": PLAIN + _header("s", b"S", 0) + END,
    "after-end-garbage": PLAIN + bytes(512) + b"junk".ljust(512, b"\0"),
    "no-end": PLAIN,
    "one-end-block": PLAIN + bytes(512),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("policy", ["all", "none"])
def test_hand_made(name, policy):
    data = CASES[name]
    same(data, policy)
    for cut in range(0, len(data), 128):  # and every cut of them
        same(data[:cut], policy)


def test_fast_path_covers_ordinary_chains():
    """The chains a layer is made of never reach tarfile (else there is no gain)."""
    ordinary = ["prefix", "v7-dir", "long-name-dir", "pax-then-long", "long-link-then-pax"]
    ordinary += ["record-size", "record-not-utf8", "contiguous-type", "signed-checksum"]
    for name in ordinary:
        data = CASES[name]
        assert same(data) == len(list(tarfile.open(fileobj=io.BytesIO(data)))), name


@pytest.mark.parametrize(("limit", "value"), [("MAX_HEADER_CHAIN", 1), ("MAX_HEADER_SIZE", 5)])
def test_tarsafe_limits_hold(monkeypatch, limit, value):
    """tarsafe's limits, lowered, bind the fast path as they bind tarfile."""
    monkeypatch.setattr(tarsafe, limit, value)
    data = CASES["long-link-then-pax"]
    same(data)
    with pytest.raises(CorruptLayer):
        tarstream_members(data)


def tarstream_members(data: bytes) -> int:
    reader = tarstream.TarReader(_Source(data), unpack.TAR_BUFSIZE)
    while reader.next() is not None:
        pass
    return reader.count


# ----- compressed streams: decompression errors surface where they did -----------------------
@pytest.mark.parametrize("cut", [100, 3000, 20_000, 60_000])
def test_truncated_gzip(gnu_tree, cut):
    packed = gzip.compress(_gnu_tar(gnu_tree, GNU_TARS["pax"]))[:cut]
    same(lambda: gzip.GzipFile(fileobj=io.BytesIO(packed)))


# ----- hypothesis: mutated and random tars ---------------------------------------------------
BASES = [_python_tar(tarfile.PAX_FORMAT)[:30_000], _python_tar(tarfile.GNU_FORMAT)[:30_000]]


@SETTINGS
@given(
    base=st.sampled_from(range(len(BASES))),
    flips=st.lists(st.tuples(st.integers(0, 8000), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 30_000)),
)
def test_mutated_tars(base, flips, cut):
    data = bytearray(BASES[base])
    for pos, x in flips:
        data[pos] ^= x
    same(bytes(data[:cut] if cut is not None else data))


blocks = st.one_of(
    st.binary(min_size=512, max_size=512),
    st.sampled_from([bytes(512), _header(), _header("d", b"5"), _header("x", b"x", 11)]),
    st.binary(max_size=40).map(lambda r: _pax(r)),
    st.binary(max_size=40).map(lambda r: _pax(b"%d %s\n" % (len(r) + 5, r))),
)


@SETTINGS
@given(st.lists(blocks, max_size=8), st.binary(max_size=600))
def test_random_blocks(parts, tail):
    same(b"".join(parts) + tail)


# ----- the applier, through unpack: the same tree or the same error -----------------------
def _apply(data: bytes, root: Path, new: bool) -> str:
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    writer = LayerWriter(fd, tarapply.OVERLAY)
    raw, hasher = io.BytesIO(data), unpack.Digest.hasher_for()

    def hashed(n: int = -1, /) -> bytes:  # the DiffID, hashed below the stream as unpack does
        chunk = raw.read(n)
        hasher.update(chunk)
        return chunk

    stream = unpack._TarStream(SimpleNamespace(read=hashed), "tar")
    try:
        if new:
            end = unpack._apply_all(stream, writer)
        else:
            end = _old_apply_all(_Source(stream), writer.apply)
        stream.check_end(end)
        writer.finish()
        return "ok " + hasher.hexdigest()
    except CorruptLayer as exc:
        return f"CorruptLayer: {exc}"
    finally:
        writer.close()
        os.close(fd)


def _tree(root: Path, times: bool = True) -> list:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            body = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            # directories made as parents of an entry have the time of the unpack
            # (and a file the failed entry left has the time it was made)
            keep = times and (os.path.isfile(p) or st_.st_mtime_ns < 1.7e18)
            mtime = st_.st_mtime_ns if keep else None
            out.append((os.path.relpath(p, root), st_.st_mode, st_.st_size, mtime, body))
    return sorted(out)


@pytest.mark.parametrize("name", ["empty", "garbage", "after-end-garbage", "no-end",
                                  "record-size-negative", "bad-checksum", "prefix-dir",
                                  "long-name-dir", "zero-length-record"])  # fmt: skip
def test_applied_like_before(tmp_path, name):
    data = CASES[name]
    for i, cut in enumerate(sorted({len(data), *range(0, len(data), 256)})):
        old = _apply(data[:cut], tmp_path / f"old{i}", new=False)
        new = _apply(data[:cut], tmp_path / f"new{i}", new=True)
        assert new == old
        ok = old.startswith("ok")
        assert _tree(tmp_path / f"new{i}", ok) == _tree(tmp_path / f"old{i}", ok)


def test_applied_gnu_tar_like_before(tmp_path, gnu_tree):
    data = _gnu_tar(gnu_tree, GNU_TARS["pax-xattrs"])
    assert _apply(data, tmp_path / "old", new=False) == _apply(data, tmp_path / "new", new=True)
    assert _tree(tmp_path / "new") == _tree(tmp_path / "old")

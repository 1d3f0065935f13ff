"""Reading a layer tar without trusting it: names, header bounds, PAX records.

tarfile parses; this module bounds what it may do with hostile input and turns tar names into
safe paths.  The rules (the limits are the module constants below):
  - Names are normalised lexically, as Docker does: a leading "/" or "./" and "." components
    are dropped, `a/../b` becomes `b`; a `..` that would leave the root, a component over
    MAX_NAME_BYTES or a path over MAX_PATH_BYTES is a `CorruptLayer` naming the entry.
  - `SafeTarInfo` refuses oversized pax / GNU long-name headers, long chains of them, oversized
    global pax state and GNU sparse maps with too many regions, before tarfile reads them into
    memory (tarfile itself would read any size).
  - Entry counts and file sizes are checked by the callers (`unpack`, `tarapply`).
Pure functions and a TarInfo subclass; thread-safe.
"""

from __future__ import annotations

import base64
import os
import tarfile
import urllib.parse
from typing import Any

from .errors import CorruptLayer

MAX_FILE_SIZE = 64 << 30  # one regular file
MAX_ENTRIES = 10_000_000  # tar members in one layer
MAX_NAME_BYTES = 255  # one path component
MAX_PATH_BYTES = 4096  # a whole path
MAX_HEADER_SIZE = 1 << 20  # one pax or GNU long-name header, and all pax globals together
MAX_HEADER_CHAIN = 16  # extension headers in front of one member
MAX_SPARSE_REGIONS = 1 << 16  # regions of one GNU sparse file

_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_EXTENSIONS = (*_LONG, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def shown(name: str, limit: int = 120) -> str:
    """A tar name as error messages show it: quoted, and shortened when absurdly long."""
    return repr(name if len(name) <= limit else name[:limit] + "…")


def split_path(name: str, entry: str) -> list[bytes]:
    """The components of a tar name inside the layer root (empty: the root itself); `entry`
    names the member in errors (as `shown` makes it)."""
    raw = os.fsencode(name)
    if len(raw) > MAX_PATH_BYTES:
        raise CorruptLayer(f"entry {entry}: path longer than {MAX_PATH_BYTES} bytes")
    comps = raw.split(b"/")
    # the usual name (no empty, `.` or `..` component, no NUL, no long name) as it is: the
    # checks below in C, not a Python loop per component (a commit's layer build, a pull)
    if (
        b"" not in comps
        and b"." not in comps
        and b".." not in comps
        and b"\0" not in raw
        and max(map(len, comps)) <= MAX_NAME_BYTES
    ):
        return comps
    parts: list[bytes] = []
    for comp in comps:
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                raise CorruptLayer(f"entry {entry}: path {shown(name)} escapes the layer root")
            parts.pop()
            continue
        if len(comp) > MAX_NAME_BYTES:
            raise CorruptLayer(f"entry {entry}: a name is longer than {MAX_NAME_BYTES} bytes")
        if b"\0" in comp:
            raise CorruptLayer(f"entry {entry}: NUL byte in path")
        parts.append(comp)
    return parts


class SafeTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with bounds on what header parsing may hold in memory."""

    def _proc_member(self, tf: Any) -> Any:
        if self.type not in _EXTENSIONS:
            return super()._proc_member(tf)  # type: ignore[misc]
        if self.size > MAX_HEADER_SIZE:
            raise CorruptLayer(f"extended header of {self.size} bytes (limit {MAX_HEADER_SIZE})")
        depth = getattr(tf, "_layer_header_depth", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise CorruptLayer(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
        tf._layer_header_depth = depth + 1
        try:
            member = super()._proc_member(tf)  # type: ignore[misc]
        finally:
            tf._layer_header_depth = depth
        if self.type == tarfile.XGLTYPE and _dict_size(tf.pax_headers) > MAX_HEADER_SIZE:
            raise CorruptLayer(f"global pax headers exceed {MAX_HEADER_SIZE} bytes")
        return member

    def _proc_sparse(self, tf: Any) -> Any:
        """Old GNU sparse member: tarfile's own code, with a bound on the region count."""
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while isextended:
            buf = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise CorruptLayer("truncated GNU sparse header")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            if len(structs) > MAX_SPARSE_REGIONS:
                raise CorruptLayer(f"sparse file with more than {MAX_SPARSE_REGIONS} regions")
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, nxt: Any, pax_headers: dict[str, str], tf: Any) -> None:
        """GNU sparse 1.0: the map is in the data; bound it before tarfile reads it."""
        head = tf.fileobj.read(tarfile.BLOCKSIZE)
        fields, _, rest = head.partition(b"\n")
        if not fields.isdigit() or int(fields) > MAX_SPARSE_REGIONS:
            raise CorruptLayer("bad or oversized GNU sparse 1.0 map")
        numbers: list[int] = []
        while len(numbers) < int(fields) * 2:
            if b"\n" not in rest:
                if len(rest) > 64:
                    raise CorruptLayer("bad GNU sparse 1.0 map")
                more = tf.fileobj.read(tarfile.BLOCKSIZE)
                if not more:
                    raise CorruptLayer("truncated GNU sparse 1.0 map")
                rest += more
            number, _, rest = rest.partition(b"\n")
            numbers.append(int(number))
        nxt.offset_data = tf.fileobj.tell()
        nxt.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


def _dict_size(d: dict[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in d.items())


def pax_xattrs(member: tarfile.TarInfo) -> list[tuple[bytes, bytes]]:
    """Extended attributes recorded as `SCHILY.xattr.*` (or libarchive's) PAX records."""
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape")
            out.append((name, value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            out.append((name, base64.b64decode(value, validate=True)))
    return out


def _ns(member: tarfile.TarInfo, key: str, default: int) -> int:
    text = member.pax_headers.get(key)
    if text is not None:
        try:
            from decimal import Decimal  # here: only a PAX time with a fraction needs it

            return int(Decimal(text) * 1_000_000_000)
        except (ArithmeticError, ValueError):
            pass
    return default


def times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; PAX times keep their fraction exactly."""
    mtime = _ns(member, "mtime", int(member.mtime) * 1_000_000_000)
    return _ns(member, "atime", mtime), mtime

"""Changeset: an upper directory (kernel-overlayfs format) → its changes and an OCI layer tar.

    changes(upper, lowers) -> Changes                  podman-style A / C / D paths
    write_changeset(upper, lowers, out, source_date_epoch, mirror)   the OCI changeset tar (PAX)

Only the upper is walked.  The lower stack (base first, as `pull.image_layers` returns it) is
consulted by point lookups only where the answer matters: whether a path existed below (A or
C), whether a whiteout hides something (else it is dropped), whether an opaque directory hides
a lower directory (else no `.wh..wh..opq`).  The one exception is a moved directory (one
carrying `overlay.redirect`): its content is its upper part merged with the lower directory at
the redirect path, and that whole tree is emitted as added at the new path (with an opaque
marker when a lower directory of the new name exists); the old name's whiteout is in the upper.
A metacopy file (copied up with metacopy=on: only its metadata is in the upper) is stored with
the bytes of the lower file that holds its data (`_Walker.metacopy_data`).

Tar layout (image-spec layer.md), the same bytes for the same upper (written by `tarwrite`:
tarfile's PAX format, byte for byte): entries in byte order of
their names, depth first; in a directory, its entry, then `DIR/.wh..wh..opq` if opaque, then its
whiteouts (`.wh.NAME`, empty files), then its other children.  The root is not emitted.
A file or symlink the upper holds exactly as the lower one it covers (an `unchanged` predicate
says so: commit's `imagestore.unchanged`) is left out; directories are always emitted.
Non-directories seen twice (same st_dev/st_ino) become tar hard links to the first name.
Numeric owners only, integer mtimes (clamped to `source_date_epoch` when given), xattrs as PAX
`SCHILY.xattr.*` without the internal ones (`markers.is_internal_xattr`).  Sockets cannot be
stored in a tar and are skipped, as buildah does.
A `mirror` (commit's one pass: `layerbuild`) is told of every member right after it is
written, as a reader of the tar will see it, with a regular file's data (`FileData`: the open
file and the xxh3-128 of the bytes that went into the tar), so the layer's unpacked directory
is built without reading the blob back.

Every read goes through `fsat.PLAIN` (openat chains for paths past PATH_MAX): an upper whose
own location makes its absolute paths longer than 4,096 bytes commits like any other, and
`changes` lists paths of any length.  A path *inside* the layer longer than
`tarsafe.MAX_PATH_BYTES` — the mount allows it — is refused by `write_changeset` with a
`ChangesetError` naming it, before any blob is written: the store would refuse to unpack it.
Concurrency: reads only; the caller keeps the upper still while it runs (the daemon holds
mutations during a live commit).  Lower layers are read-only by contract.
"""

from __future__ import annotations

import copy
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from unionfs import markers, rules
from unionfs.fsat import PLAIN

from . import fingerprints, sparse, tarsafe
from .errors import StoreError
from .tarwrite import TarWriter

OBJ, WHITEOUT, OPAQUE = "obj", "whiteout", "opaque"


class ChangesetError(StoreError):
    """The upper holds something an OCI layer cannot express (a user file named `.wh.*`)."""


@dataclass
class Changes:
    """Paths from the root (`/etc/passwd`), each list sorted."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        return {"added": self.added, "changed": self.changed, "deleted": self.deleted}

    def lines(self) -> list[str]:
        """`A path` / `C path` / `D path`, sorted by path as podman prints them."""
        tagged = (
            [(p, "A") for p in self.added]
            + [(p, "C") for p in self.changed]
            + [(p, "D") for p in self.deleted]
        )
        return [f"{k} {p}" for p, k in sorted(tagged)]


class FileData(NamedTuple):
    """A regular file's data as it went into the tar, for a `Mirror`: `fd` is open on the real
    file (valid during the call only: the data is still there to copy), `regions` are its data
    regions when it was written sparse, `digest` the xxh3-128 of its whole content (holes as
    zeros), taken from the bytes that passed into the tar; `path` is the real file's (another
    process opens it by that: `layerbuild`'s child)."""

    fd: int
    size: int
    regions: sparse.Regions | None
    digest: bytes
    path: bytes


# (upper object, its lstat, the lower object it covers, its lstat) → True: leave it out
SameAsBelow = Callable[[bytes, os.stat_result, bytes, os.stat_result], bool]

# told of each member as a reader of the tar sees it (a sparse file by its real name, its
# whole size, `sparse` set), with FileData for a regular file's
Mirror = Callable[[tarfile.TarInfo, FileData | None], None]


class Item(NamedTuple):
    """One changeset entry: `path` relative to the root (no leading slash).  (A NamedTuple,
    not a frozen dataclass: one is made per entry, and its __init__ costs 5× as much.)"""

    kind: str  # OBJ, WHITEOUT (of `path`) or OPAQUE (the directory `path`)
    path: bytes
    real: bytes = b""  # OBJ: the real object whose content and metadata are emitted
    st: os.stat_result | None = None
    change: str = ""  # OBJ: "A" or "C"
    below: _Found | None = None  # OBJ "C": the lower object it covers
    data: bytes = b""  # a metacopy file (`_Walker.metacopy_data`): the lower file with its bytes


class _Found(NamedTuple):
    """What the lower stack holds at a name: the topmost object, and for a directory every
    real directory that merges into it (top-first, cut after the first opaque one)."""

    path: bytes
    st: os.stat_result
    chain: list[bytes]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class _Lower:
    """Point lookups in the merged lower stack (overlayfs rules, every marker encoding)."""

    def __init__(self, lowers: list[Path]) -> None:
        self.root = [os.fsencode(os.path.abspath(p)) for p in reversed(lowers)]
        self._marks: dict[bytes, markers.DirMarks] = {}

    def marks(self, path: bytes) -> markers.DirMarks:
        m = self._marks.get(path)
        if m is None:
            m = self._marks[path] = markers.dir_marks(path)
        return m

    def _layer(self, d: bytes) -> int:
        """The index in `root` of the layer that directory `d` (a path under a root) is in."""
        best = -1
        for k, r in enumerate(self.root):
            if (d == r or d.startswith(r + b"/")) and (best < 0 or len(r) > len(self.root[best])):
                best = k
        return best

    def child(self, chain: list[bytes], name: bytes) -> _Found | None:
        dirs: list[bytes] = []
        for i, d in enumerate(chain):
            p = d + b"/" + name
            st = _lstat(p)
            if st is None:
                if _lstat(d + b"/" + markers.oci_whiteout_name(name)) is not None:
                    break
                continue
            if rules.is_whiteout(p, st, self.marks(d).xwhiteouts):
                break
            if not stat.S_ISDIR(st.st_mode):
                if not dirs:
                    return _Found(p, st, [])
                break
            dirs.append(p)
            marks = self.marks(p)
            if rules.is_opaque(p, marks, oci=True):  # every layer here is a lower
                break
            # a directory moved in a layer that was once an upper: its lower part is where
            # its redirect says, in the layers below (as the kernel's lookup follows it)
            redirect = rules.redirect_of(marks)
            if redirect is not None:
                if redirect.startswith(b"/"):
                    dirs.extend(self.resolve(redirect, self.root[self._layer(d) + 1 :]))
                else:
                    found = self.child(chain[i + 1 :], redirect)
                    dirs.extend(found.chain if found is not None and found.is_dir else [])
                break
        if not dirs:
            return None
        return _Found(dirs[0], PLAIN.lstat(dirs[0]), dirs)

    def resolve(self, path: bytes, roots: list[bytes] | None = None) -> list[bytes]:
        """The directory chain at an absolute path (a redirect target) in the lower stack,
        or in `roots` (the layers below one); [] if none."""
        chain = self.root if roots is None else roots
        for part in path.strip(b"/").split(b"/"):
            if not part:
                continue
            found = self.child(chain, part)
            if found is None or not found.is_dir:
                return []
            chain = found.chain
        return chain

    def names(self, chain: list[bytes]) -> set[bytes]:
        """Candidate names of a merged directory (markers excluded; `child` decides)."""
        out: set[bytes] = set()
        for d in chain:
            with PLAIN.scandir(d) as it:
                for de in it:
                    name: bytes = de.name
                    if not name.startswith(markers.WH_PREFIX):
                        out.add(name)
        return out


class _Walker:
    def __init__(self, upper: Path, lowers: list[Path], data: bool = False) -> None:
        self.upper = os.fsencode(os.path.abspath(upper))
        self.lower = _Lower(lowers)
        self.data = data  # find the data of metacopy files (a listxattr per upper file)

    def items(self) -> Iterator[Item]:
        """Drive the walk with an explicit stack: `_dir`, `_upper_obj` and `_lower_obj` yield
        Items, or a generator for a subtree, run before their next item (the order of a
        recursive walk, at any depth: no Python recursion)."""
        stack: list[Iterator[Item | Iterator[Any]]] = [
            self._dir(b"", self.upper, self.lower.root, whole=False)
        ]
        while stack:
            try:
                got = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            if isinstance(got, Item):
                yield got
            else:
                stack.append(got)

    def _dir(
        self, rel: bytes, real: bytes | None, chain: list[bytes], whole: bool
    ) -> Iterator[Any]:
        """Children of one directory.  `whole`: emit the merged content (a moved tree);
        otherwise only what the upper changed, with the whiteouts that matter."""
        upper: dict[bytes, os.stat_result] = {}
        hidden: set[bytes] = set()
        if real is not None:
            with PLAIN.scandir(real) as it:
                for de in it:
                    name: bytes = de.name
                    st = de.stat(follow_symlinks=False)
                    if markers.is_chardev_whiteout(st):
                        hidden.add(name)
                    else:
                        upper[name] = st
        if not whole:
            for name in sorted(hidden):
                if chain and self.lower.child(chain, name) is not None:
                    yield Item(WHITEOUT, _join(rel, name))
        lower_only: list[bytes] = []
        if whole and chain:
            lower_only = [n for n in self.lower.names(chain) - hidden if n not in upper]
        for name in sorted([*upper, *lower_only]):
            below = self.lower.child(chain, name) if chain else None
            if name in upper:
                yield self._upper_obj(rel, real, name, upper[name], below, chain, whole)
            elif below is not None:
                yield self._lower_obj(_join(rel, name), below)

    def _upper_obj(
        self,
        rel: bytes,
        parent: bytes | None,
        name: bytes,
        st: os.stat_result,
        below: _Found | None,
        chain: list[bytes],
        whole: bool,
    ) -> Iterator[Any]:
        """One upper object; `chain` is its parent's lower part (where `below` was found)."""
        assert parent is not None
        path, real = _join(rel, name), parent + b"/" + name
        if name.startswith(markers.WH_PREFIX):
            raise ChangesetError(
                f"{os.fsdecode(b'/' + path)}: a file named .wh.* cannot be stored in a layer"
            )
        if stat.S_ISSOCK(st.st_mode):
            return
        data = b""
        if self.data and stat.S_ISREG(st.st_mode):
            data = self.metacopy_data(real, name, chain, None, path)
        if below is not None and not whole:
            yield Item(OBJ, path, real, st, "C", below, data)
        else:
            yield Item(OBJ, path, real, st, "A", data=data)
        if not stat.S_ISDIR(st.st_mode):
            return
        marks = self.lower.marks(real)
        lower_dir = below is not None and below.is_dir and not whole
        target = rules.redirect_of(marks)
        if target is not None:
            if lower_dir:
                yield Item(OPAQUE, path)
            # the kernel's redirect: absolute from the lower root, or relative, a name in the
            # parent's lower part (which is itself where the parent's redirect led)
            if target.startswith(b"/"):
                moved = self.lower.resolve(target)
            else:
                found = self.lower.child(chain, target) if chain else None
                moved = found.chain if found is not None and found.is_dir else []
            yield self._dir(path, real, moved, whole=True)
        elif marks.opaque:
            if lower_dir:
                yield Item(OPAQUE, path)
            yield self._dir(path, real, [], whole)
        else:
            chain = below.chain if below is not None and below.is_dir else []
            yield self._dir(path, real, chain, whole)

    def metacopy_data(
        self, real: bytes, name: bytes, chain: list[bytes], roots: list[bytes] | None,
        path: bytes,
    ) -> bytes:  # fmt: skip
        """For a file kernel overlayfs (or layerfs) copied up with metacopy=on, holding
        only its metadata (`overlay.metacopy`: its bytes are a hole), the lower file that
        holds its data, found as the kernel's lookup finds it: where its `overlay.redirect`
        points (absolute: from the root of the layers below; relative: a name in the same
        directory), else the same name in the parent's lower part (`chain`, which already
        followed the directories' redirects); through a lower metacopy file (an old upper
        stacked below) to the layers below it.  b"" for any other file.  `roots`: the
        layers an absolute redirect starts from (None: every lower layer)."""
        try:
            names = {os.fsencode(n) for n in PLAIN.listxattr(real)}
        except OSError:
            return b""
        if not names.intersection(markers.METACOPY_XATTRS):
            return b""
        redirect = None
        for xname in markers.REDIRECT_XATTRS:
            if xname in names:
                redirect = rules.clean_redirect(PLAIN.getxattr(real, xname))
        if redirect is not None and redirect.startswith(b"/"):
            parent, _, name = redirect.strip(b"/").rpartition(b"/")
            chain = self.lower.resolve(parent, roots)
        elif redirect is not None:
            name = redirect
        found = self.lower.child(chain, name) if chain else None
        if found is None or not stat.S_ISREG(found.st.st_mode):
            raise ChangesetError(
                f"{tarsafe.shown('/' + os.fsdecode(path))}: a metacopy file (copied up with "
                "metacopy=on: only its metadata is in the upper) whose data is in no lower "
                "layer: it cannot be committed"
            )
        k = self.lower._layer(found.path)
        below = [d for d in chain if self.lower._layer(d) > k]
        deeper = self.metacopy_data(found.path, name, below, self.lower.root[k + 1 :], path)
        return deeper or found.path

    def _lower_obj(self, path: bytes, found: _Found) -> Iterator[Any]:
        if stat.S_ISSOCK(found.st.st_mode):
            return
        yield Item(OBJ, path, found.path, found.st, "A")
        if found.is_dir:
            yield self._dir(path, None, found.chain, whole=True)


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return PLAIN.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def walk(upper: Path, lowers: list[Path], data: bool = False) -> Iterator[Item]:
    """The changeset's entries in tar order (see the module docstring).  `data`: find
    where each metacopy file's data is (`Item.data`; a listxattr per upper file)."""
    return _Walker(upper, lowers, data).items()


def changes(upper: Path, lowers: list[Path]) -> Changes:
    """Podman-style changes of `upper` over `lowers` (base first).  A directory present below
    is reported changed whenever it is in the upper (it holds a change, or was copied up)."""
    out = Changes()
    for item in walk(upper, lowers):
        shown = "/" + os.fsdecode(item.path)
        if item.kind == WHITEOUT:
            out.deleted.append(shown)
        elif item.kind == OBJ:
            (out.added if item.change == "A" else out.changed).append(shown)
    for lst in (out.added, out.changed, out.deleted):
        lst.sort()
    return out


# ----- the tar ---------------------------------------------------------------------------
def max_layer_bytes() -> int:
    """What one commit may write (the uncompressed tar): $LAYER_MAX_COMMIT_SIZE bytes, else
    MAX_LAYER_BYTES.  Sparse files count by their data, not their apparent size."""
    text = os.environ.get("LAYER_MAX_COMMIT_SIZE", "")
    try:
        return int(text) if text else MAX_LAYER_BYTES
    except ValueError:
        raise ChangesetError(
            f"LAYER_MAX_COMMIT_SIZE must be a number of bytes, not {text!r}"
        ) from None


MAX_LAYER_BYTES = 256 << 30


class _Counter:
    """A write-only sink that stops past `limit`."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self._out = out
        self.offset = 0
        self.limit = limit

    def write(self, data: bytes) -> int:
        if self.offset + len(data) > self.limit:
            raise ChangesetError(
                f"the layer would pass {self.limit} bytes (LAYER_MAX_COMMIT_SIZE); not committed"
            )
        self._out.write(data)
        self.offset += len(data)
        return len(data)


def write_changeset(
    upper: Path,
    lowers: list[Path],
    out: BinaryIO,
    source_date_epoch: int | None = None,
    mirror: Mirror | None = None,
    unchanged: SameAsBelow | None = None,
) -> None:
    """Write the OCI changeset tar of `upper` over `lowers` (base first) to `out`, telling
    `mirror` of each member as it goes (see the module docstring).  `unchanged` (commit's
    `imagestore.unchanged`) leaves out a file or symlink it finds the same as the lower one."""
    links: dict[tuple[int, int], str] = {}
    tar = TarWriter(_Counter(out, max_layer_bytes()))
    for item in walk(upper, lowers, data=True):
        name = os.fsdecode(item.path)
        if len(item.path) + len(markers.WH_OPAQUE) + 1 > tarsafe.MAX_PATH_BYTES:
            _check_length(item)
        if item.kind == OBJ:
            below, st = item.below, item.st
            if (
                unchanged is not None
                and below is not None
                and st is not None
                and not stat.S_ISDIR(st.st_mode)
                and not item.data  # a metacopy file: metadata only, so a change of it
                and unchanged(item.real, st, below.path, below.st)
            ):
                continue
            _add_obj(tar, item, name, links, source_date_epoch, mirror)
            continue
        if item.kind == WHITEOUT:
            _emit(tar, _marker(os.fsdecode(markers.oci_whiteout_path(item.path))), mirror)
        else:
            _emit(tar, _marker(os.fsdecode(markers.oci_opaque_path(item.path))), mirror)
    tar.close()  # only once every member is in: a failure leaves no well-ended tar


def _check_length(item: Item) -> None:
    """Refuse an entry the store could not unpack (tarsafe's limit), naming it."""
    if item.kind == WHITEOUT:
        entry = markers.oci_whiteout_path(item.path)
    elif item.kind == OPAQUE:
        entry = markers.oci_opaque_path(item.path)
    else:
        entry = item.path
    if len(entry) > tarsafe.MAX_PATH_BYTES:
        raise ChangesetError(
            f"{tarsafe.shown('/' + os.fsdecode(entry))}: a path longer than "
            f"{tarsafe.MAX_PATH_BYTES} bytes cannot be stored in a layer"
        )


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def _add_obj(
    tar: TarWriter,
    item: Item,
    name: str,
    links: dict[tuple[int, int], str],
    sde: int | None,
    mirror: Mirror | None,
) -> None:
    st = item.st
    assert st is not None
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    mtime = int(st.st_mtime)
    info.mtime = min(mtime, sde) if sde is not None else mtime
    info.pax_headers = {"SCHILY.xattr." + k: v for k, v in user_xattrs(item.real)}
    fmt = stat.S_IFMT(st.st_mode)
    ident = (st.st_dev, st.st_ino)
    if fmt != stat.S_IFDIR and st.st_nlink > 1:
        first = links.get(ident)
        if first is not None:
            info.type, info.linkname = tarfile.LNKTYPE, first
            return _emit(tar, info, mirror)
        links[ident] = name
    if fmt == stat.S_IFREG:
        return _add_file(tar, item, name, info, mirror)
    if fmt == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif fmt == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, os.fsdecode(PLAIN.readlink(item.real))
    elif fmt == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        raise ChangesetError(f"/{name}: unsupported file type {fmt:o}")
    _emit(tar, info, mirror)


def _emit(tar: TarWriter, info: tarfile.TarInfo, mirror: Mirror | None) -> None:
    """A member without data."""
    tar.add(info)
    if mirror is not None:
        mirror(info, None)


def _add_file(
    tar: TarWriter, item: Item, name: str, info: tarfile.TarInfo, mirror: Mirror | None
) -> None:
    """A regular file's member: dense, or sparse when it has holes worth it (`sparse`).  A
    metacopy file's bytes come from the lower file that holds them (`Item.data`)."""
    source = item.data or item.real
    fd = PLAIN.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > tarsafe.MAX_FILE_SIZE:
            raise ChangesetError(
                f"/{name}: {size} bytes; a layer file is at most {tarsafe.MAX_FILE_SIZE}"
            )
        regions = sparse.data_regions(fd, size)
        hasher = fingerprints.new_hasher() if mirror is not None else None
        seen = info
        if regions is not None:
            seen = copy.copy(info)  # before sparse_member renames it: what a reader sees
            seen.size = size
            # a list of (offset, length), as tarfile sets it when reading
            seen.sparse = [r for r in regions if r[1]]  # type: ignore[assignment]
            data = sparse.sparse_member(info, fd, size, regions, hasher)
            tar.add(info, data.read)
            digest = data.content_digest() if hasher is not None else b""
        else:
            info.size = size
            tar.add(info, _hashed_reader(fd, hasher))
            digest = hasher.digest() if hasher is not None else b""
        if mirror is not None:
            mirror(seen, FileData(fd, size, regions, digest, source))
    finally:
        os.close(fd)


def _hashed_reader(fd: int, hasher: Any) -> Callable[[int], bytes]:
    """read(n) of the file at its offset, every byte passing through `hasher` (if any)."""
    if hasher is None:
        return lambda n: os.read(fd, n)

    def read(n: int) -> bytes:
        data = os.read(fd, n)
        hasher.update(data)
        return data

    return read


def user_xattrs(path: bytes) -> list[tuple[str, str]]:
    """User-visible xattrs, sorted, as PAX wants them (surrogate-escaped text)."""
    try:
        names = PLAIN.listxattr(path)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        raw = os.fsencode(n)
        if markers.is_internal_xattr(raw):
            continue
        try:
            value = PLAIN.getxattr(path, os.fsencode(n))
        except OSError:
            continue
        out.append((n, value.decode("utf-8", "surrogateescape")))
    return out

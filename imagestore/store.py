"""Store: the on-disk image store, an OCI image layout with our extra state beside it.

    ROOT/oci-layout, ROOT/index.json, ROOT/blobs/sha256/<hex>   the OCI image layout, as is
    ROOT/ingest/                 blobs being written (debris after a crash, never referenced)
    ROOT/layers/<diffid-hex>/diff     each layer unpacked once, shared by every image;
    ROOT/layers/<diffid-hex>/complete written last: only then does the layer exist
    ROOT/mounts/<name>/{upper,work,merged}   writable mounts

Lifecycle, as containerd's content store and umoci's cas.Engine state it:
  - `ingest()` writes a blob under ingest/, hashing while writing; `commit()` fsyncs, verifies
    digest and size, and renames into blobs/ — atomic and idempotent (an existing blob wins).
    A resumable ingest (with a key) keeps its partial file between attempts.
  - One writer per ingest file, across threads and processes: an Ingest holds an exclusive
    flock on its file from open to commit/abort/close (`locked_file`).  Another process that
    wants the same key waits; it then finds the blob committed (`Ingest.present`), or the
    partial file left by a writer that failed, which it rehashes and resumes.  `commit`
    checks that the file holds exactly the bytes it hashed before renaming it into blobs/.
  - `tag()`/`untag()` rewrite index.json atomically (durable.write_atomic: temp file, fsync,
    rename, fsync the directory); every durable write of the store goes through durable.py.
  - `transaction()` is the store-wide advisory lock (flock on ROOT/lock), as a context
    manager yielding a `Transaction`: the only object with `tag`/`untag`, and what
    mountrecords.save/remove insist on (`require_transaction`), so index.json and the mount
    records are never changed without it; two processes never interleave those writes.
    Transactions do not nest (a second flock of ours would wait for the first forever).
Threads: an Ingest belongs to one thread; Store methods other than tag/untag are safe to call
from several threads (they only create new names atomically).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import durable
from .digest import Digest
from .durable import write_atomic
from .errors import (
    BadReference,
    BlobNotFound,
    DamagedStore,
    DigestMismatch,
    ImageNotFound,
    StoreBusy,
)
from .follow import Follower

if TYPE_CHECKING:  # imported where used at run time, like media's other users here
    from .media import Descriptor

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def default_root() -> Path:
    env = os.environ.get("LAYER_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/layer")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "layer"


def locked_file(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """Open (creating) `path` and take an exclusive flock on it, waiting for its holder.

    The lock holder may rename or unlink the file before it lets go; a waiter that then
    finds another file (or none) under the name starts over, so the fd returned is locked
    and is the file `path` names now.  The caller closes the fd to release the lock."""
    while True:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            here = os.fstat(fd)
            if st is not None and (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


MAX_TAG_NAME = 255


def check_tag_name(name: str) -> str:
    """An image name for index.json: not empty, at most MAX_TAG_NAME characters, no control
    characters and no white space (a name is one word on every line `layer images` prints)."""
    if not name:
        raise BadReference("an image name cannot be empty")
    if len(name) > MAX_TAG_NAME:
        raise BadReference(f"an image name is at most {MAX_TAG_NAME} characters")
    bad = next((c for c in name if not c.isprintable() or c.isspace()), None)
    if bad is not None:
        raise BadReference(f"image name {name!r} holds {bad!r} (no spaces or control characters)")
    return name


FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long); the kernel copies an int either way
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000  # chattr +T


def _mark_top_dir(path: Path) -> None:
    """Tell the filesystem that the directories made in `path` hold unrelated trees
    (FS_TOPDIR_FL, `chattr +T`): ext4's Orlov allocator then places each in a block group
    with free inodes and blocks, as it does directories made in the root, instead of next to
    their parent.  Each of a store's layers and mounts is such a tree.  On a filesystem that
    has been filling up for a while, the parent's group can be so crowded that every file
    created in the tree pays the allocator's search: 260–370 µs a create in one store here
    against 11–17 µs in a directory made after marking.  Where the filesystem has no such
    flag or it cannot be set (tmpfs, btrfs, FUSE, not the owner), nothing changes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")
        if not flags & FS_TOPDIR_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, (flags | FS_TOPDIR_FL).to_bytes(8, "little"))
    except OSError:  # ENOTTY, EOPNOTSUPP, EPERM, EACCES
        pass
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.blobs = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"
        self.layers = self.root / "layers"
        self.mounts = self.root / "mounts"
        self.diffids = self.root / "diffids"  # verified blob → DiffID, one file per blob
        self._followers: dict[Digest, Follower] = {}  # blobs a reader follows as written
        self._followers_lock = threading.Lock()
        self._txn: Transaction | None = None  # the open transaction() of this object

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None) -> Store:
        """Open the store, creating the layout when it is missing (idempotent)."""
        store = cls(root if root is not None else default_root())
        store._private_root()
        for d in (store.blobs, store.ingest_dir, store.layers, store.mounts, store.diffids):
            d.mkdir(parents=True, exist_ok=True)
        for d in (store.layers, store.mounts):  # one unrelated tree in each entry of these
            _mark_top_dir(d)
        if not (store.root / "oci-layout").exists():
            write_atomic(store.root / "oci-layout", json.dumps(OCI_LAYOUT).encode())
        if not (store.root / "index.json").exists():
            store._write_index({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []})
        return store

    def _private_root(self) -> None:
        """The root is 0700, as /var/lib/docker and containers-storage keep theirs: unpacked
        layers hold files that images white out, uppers hold users' data, and default
        mountpoints live here.  Created so; an older store of ours (0755) is narrowed."""
        try:
            self.root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        st = os.stat(self.root)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(self.root, stat.S_IMODE(st.st_mode) & 0o700)

    # ----- locking ------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, wait: bool = True) -> Iterator[Transaction]:
        """The index lock, held (exclusively) while the block runs: every index.json rewrite
        and every mount-record change happens inside one.  StoreBusy when `wait` is False and
        another process holds it."""
        if self._txn is not None:
            raise RuntimeError("store transactions do not nest")
        with self._flock("lock", fcntl.LOCK_EX, wait):
            self._txn = txn = Transaction(self)
            try:
                yield txn
            finally:
                self._txn = None
                txn.open = False

    def require_transaction(self) -> None:
        """For writers of state the index lock protects (mountrecords): fail loudly when the
        caller forgot `transaction()`."""
        if self._txn is None:
            raise RuntimeError("a store change outside a transaction")

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held (shared) by pull, commit and push while they write or read blobs and layers
        that no tag protects yet; `gc` takes it exclusively, so it never removes them."""
        with self._flock("gc.lock", fcntl.LOCK_SH, True):
            yield

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        with self._flock("gc.lock", fcntl.LOCK_EX, True):
            yield

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, wait: bool) -> Iterator[None]:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreBusy(f"another layer process is using {self.root}") from None
            yield
        finally:
            os.close(fd)

    # ----- blobs ---------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        if digest.algorithm != "sha256":
            return self.root / "blobs" / digest.algorithm / digest.hex
        return self.blobs / digest.hex

    def has_blob(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the store") from None

    def read_blob(self, digest: Digest, verify: bool = True) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read()
        if verify and Digest.of(data) != digest:
            raise DigestMismatch(f"blob {digest} in the store is corrupt")
        return data

    def read_json(self, digest: Digest) -> dict[str, Any]:
        """A JSON-object blob (an image config); BadManifest for anything else."""
        from .media import load

        return load(self.read_blob(digest), f"blob {digest}")

    def ingest(
        self, expected: Digest | None = None, size: int | None = None, key: str | None = None
    ) -> Ingest:
        """A new blob write; with `key`, a partial file from an earlier attempt is resumed."""
        name = key if key is not None else f"tmp-{os.urandom(8).hex()}"
        with self._followers_lock:
            follower = self._followers.get(expected) if expected is not None else None
        return Ingest(
            self,
            self.ingest_dir / name,
            expected,
            size,
            resumable=key is not None,
            follower=follower,
        )

    @contextlib.contextmanager
    def follow(self, digest: Digest) -> Iterator[Follower]:
        """A Follower of blob `digest` while it is written by this process (module
        follow): the next Ingest of it reports to the follower, until the block ends."""
        follower = Follower(digest)
        with self._followers_lock:
            mine = digest not in self._followers
            if mine:
                self._followers[digest] = follower
        if not mine:  # another thread follows it (a manifest naming a blob twice): fall back
            follower.writer_done()
        try:
            yield follower
        finally:
            if mine:
                with self._followers_lock:
                    del self._followers[digest]
            follower.close()

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        with self.ingest(expected, len(data)) as ing:
            ing.write(data)
            return ing.commit()

    # ----- verified DiffIDs ----------------------------------------------------------------
    def verified_diff_id(self, blob: Digest) -> Digest | None:
        """The DiffID `blob` was found to hold when it was decompressed and hashed (by an
        unpack or `unpack.verify_diff_id`), or None when no one has checked yet."""
        try:
            return Digest.parse((self.diffids / blob.hex).read_text().strip())
        except (FileNotFoundError, BadReference):
            return None

    def record_diff_id(self, blob: Digest, diff_id: Digest) -> None:
        """Write down a mapping that was just verified (derivable: it is a cache)."""
        write_atomic(self.diffids / blob.hex, f"{diff_id}\n".encode())

    # ----- index.json: names -------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        """index.json, checked: every entry a descriptor (DamagedStore naming the field)."""
        from .media import BadManifest, Descriptor, load

        path = self.root / "index.json"
        try:
            index = load(path.read_bytes(), "the index")
            manifests = index.get("manifests", [])
            if not isinstance(manifests, list):
                raise BadManifest("'manifests' is not a list")
            for i, entry in enumerate(manifests):
                Descriptor.from_json(entry, f"manifests[{i}]")
        except BadManifest as exc:
            raise DamagedStore(f"store index {path} is damaged: {exc}") from None
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode() + b"\n")

    def images(self) -> list[tuple[str, Descriptor]]:
        """(name, descriptor) of every named entry of index.json, in index order."""
        from .media import Descriptor

        out = []
        for i, entry in enumerate(self._read_index().get("manifests", [])):
            desc = Descriptor.from_json(entry, f"manifests[{i}]")  # checked by _read_index
            name = desc.annotations.get(REF_ANNOTATION)
            if name:
                out.append((name, desc))
        return out

    def resolve(self, name: str) -> Descriptor:
        """The descriptor tagged `name`; a manifest digest (or unique prefix) also works."""
        images = self.images()
        for n, desc in images:
            if n == name:
                return desc
        hexpart = name.removeprefix("sha256:")
        if len(hexpart) >= 12:
            found = [
                d for _, d in images if str(d.digest).removeprefix("sha256:").startswith(hexpart)
            ]
            if len({d.digest for d in found}) == 1:
                return found[0]
        raise ImageNotFound(f"no image {name!r} in {self.root}")

    # ----- unpacked layers ---------------------------------------------------------------
    def layer_dir(self, diff_id: Digest) -> Path:
        return self.layers / diff_id.hex / "diff"

    def has_layer(self, diff_id: Digest) -> bool:
        return (self.layers / diff_id.hex / "complete").exists()


class Transaction:
    """What may change only under the index lock; made by `Store.transaction()` and dead
    after its block (a kept reference cannot tag later)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.open = True

    def _check(self) -> None:
        if not self.open:
            raise RuntimeError("a store transaction used after its block")

    def tag(self, name: str, desc: Descriptor) -> None:
        """Point `name` at `desc` (replacing an older image of that name).  Atomic.  The
        entry is `desc` as JSON with its annotations plus the ref name annotation."""
        self._check()
        check_tag_name(name)
        index = self.store._read_index()
        manifests = [
            d
            for d in index.get("manifests", [])
            if d.get("annotations", {}).get(REF_ANNOTATION) != name
        ]
        entry = desc.to_json()
        entry["annotations"] = {**desc.annotations, REF_ANNOTATION: name}
        manifests.append(entry)
        index["manifests"] = manifests
        self.store._write_index(index)

    def untag(self, name: str) -> None:
        self._check()
        index = self.store._read_index()
        before = len(index.get("manifests", []))
        index["manifests"] = [
            d
            for d in index.get("manifests", [])
            if d.get("annotations", {}).get(REF_ANNOTATION) != name
        ]
        if len(index["manifests"]) == before:
            raise ImageNotFound(f"no image {name!r} in {self.store.root}")
        self.store._write_index(index)


class Ingest:
    """One blob being written: hashed while written, verified and renamed by `commit`.

    The file is locked (exclusive flock) while this object has it open, so it never has two
    writers; constructing an Ingest waits for another holder of the same key.  When that
    holder committed the blob meanwhile, `present` is true and `commit` just returns it."""

    def __init__(
        self,
        store: Store,
        path: Path,
        expected: Digest | None,
        size: int | None,
        resumable: bool,
        follower: Follower | None = None,
    ) -> None:
        self.store = store
        self._follower = follower
        self.path = path
        self.expected = expected
        self.size = size
        self.resumable = resumable
        self._hash = expected.hasher() if expected else Digest.hasher_for()
        self.offset = 0
        self.done = False
        self._file: BinaryIO | None = None
        fd = locked_file(path)
        try:
            self._file = os.fdopen(fd, "r+b")
        except BaseException:
            os.close(fd)
            raise
        if resumable:  # rehash what an earlier attempt wrote; nobody else writes it now
            self._file.seek(0)
            while chunk := self._file.read(1 << 20):
                self._hash.update(chunk)
                self.offset += len(chunk)
        else:
            self._file.truncate(0)
        self._file.seek(self.offset)
        if follower is not None:
            follower.attach(self._file.fileno(), self.offset)

    @property
    def present(self) -> bool:
        """The expected blob is in the store already (another writer committed it)."""
        return self.expected is not None and self.store.has_blob(self.expected)

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.done:
            if self.resumable and exc_type is not None:
                self.close()  # keep the partial file for the next attempt
            else:
                self.abort()

    def write(self, chunk: bytes) -> None:
        assert self._file is not None
        self._file.write(chunk)
        self._hash.update(chunk)
        self.offset += len(chunk)
        if self._follower is not None:
            self._file.flush()  # the follower reads the file, not our buffer
            self._follower.wrote(self.offset)
        if self.size is not None and self.offset > self.size:
            raise DigestMismatch(
                f"blob {self.expected} is larger than the {self.size} bytes announced"
            )

    def restart(self) -> None:
        """Throw away what was written (a server that ignored our Range request)."""
        assert self._file is not None
        self._file.truncate(0)
        self._file.seek(0)
        self._hash = self.expected.hasher() if self.expected else Digest.hasher_for()
        self.offset = 0
        if self._follower is not None:
            self._follower.restarted()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Delete the partial file (while still holding its lock), then let go."""
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.close()
        self.done = True

    def commit(self) -> Digest:
        assert self._file is not None
        if self.present:  # committed by the writer we waited for; our file is a leftover
            assert self.expected is not None
            self.abort()
            return self.expected
        durable.sync_file(self._file)
        on_disk = os.fstat(self._file.fileno()).st_size
        got = Digest.from_hash(self._hash)
        if on_disk != self.offset:
            self.abort()
            raise DigestMismatch(
                f"blob {self.expected or got}: {self.path.name} holds {on_disk} bytes, "
                f"{self.offset} were written (another writer?)"
            )
        if self.size is not None and self.offset != self.size:
            self.abort()
            raise DigestMismatch(
                f"blob {self.expected or got}: got {self.offset} bytes, expected {self.size}"
            )
        if self.expected is not None and got != self.expected:
            self.abort()
            raise DigestMismatch(f"blob digest mismatch: expected {self.expected}, got {got}")
        dest = self.store.blob_path(got)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Still under our lock: a waiter wakes to find the name gone and the blob present.
        durable.publish(self.path, dest, replace=False)
        if self._follower is not None:
            self._follower.committed()
        self.close()
        self.done = True
        return got

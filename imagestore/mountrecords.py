"""Image mounts: ROOT/mounts/<name>/{mount.json,upper,work}.

A record pins its image by manifest descriptor (digest, media type, size): the mount works
whatever happens to tags afterwards (`rmi`, a newer pull of the same name, a commit to the
base's own name), and `gc` keeps the pinned image's blobs and layers (images.referenced)
until `layer rm`.  A writable record owns an upper that survives umount/mount; a read-only
record (`read_only`) has none and pins its image while mounted.  `daemon` is what the CLI
learnt about the layerfs process serving the mount (pid and start time), opaque here.

Lifecycle: `claim(name)` is an exclusive per-name flock held by whoever checks, creates,
mounts or removes the record NAME, so two `layer mount --name X` never both decide the name
is free.  `save` and `remove` run under it and in a store transaction (they check);
records are written atomically.  Whether a mount is live is the caller's question (the
mount table and the daemon), since the store knows nothing of FUSE.  A record that does not
parse raises StoreError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fstree, media
from .durable import write_atomic
from .errors import BadReference, DamagedStore, ImageNotFound, StoreError
from .media import BadManifest, Descriptor
from .store import Store, locked_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class MountRecord:
    name: str
    image_name: str
    image: Descriptor  # media type, digest and size: all a record keeps
    mountpoint: str
    read_only: bool
    path: Path
    daemon: dict[str, int] | None = None

    @property
    def digest(self) -> str:
        """The pinned manifest digest."""
        return str(self.image.digest)

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadReference(f"bad mount name {name!r} (letters, digits, _ . -)")
    return name


@contextlib.contextmanager
def claim(store: Store, name: str) -> Iterator[None]:
    """Hold the name NAME exclusively (waits for another holder); see the module docstring."""
    lock = store.mounts / f".{check_name(name)}.lock"
    fd = locked_file(lock)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # a waiter finds the name gone and starts over
        os.close(fd)


def load(store: Store, name: str) -> MountRecord | None:
    path = store.mounts / check_name(name)
    try:
        text = (path / "mount.json").read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = media.load(text, "the record")
        if not isinstance(obj.get("image"), dict):
            raise BadManifest("'image' is missing or not an object")
        image = _pinned(Descriptor.from_json(obj["image"], "'image'"))
        for key in ("image_name", "mountpoint"):
            if not isinstance(obj.get(key), str):
                raise BadManifest(f"{key!r} is missing or not a string")
        daemon = obj.get("daemon")
        if not isinstance(daemon, dict) or not (
            isinstance(daemon.get("pid"), int) and isinstance(daemon.get("start"), int)
        ):
            daemon = None
        return MountRecord(
            name,
            obj["image_name"],
            image,
            obj["mountpoint"],
            obj.get("read_only") is True,
            path,
            daemon,
        )
    except BadManifest as exc:
        raise DamagedStore(f"mount record {path / 'mount.json'} is damaged: {exc}") from None


def all_records(
    store: Store, on_damaged: Callable[[str, StoreError], None] | None = None
) -> list[MountRecord]:
    """Every mount record, by name.  A damaged one raises (gc must not drop its pin), unless
    `on_damaged(name, error)` is given to hear of it (fsck reports it, df skips it)."""
    out = []
    for p in sorted(store.mounts.iterdir()):
        try:
            rec = load(store, p.name) if _NAME.match(p.name) else None
        except StoreError as exc:
            if on_damaged is None:
                raise
            on_damaged(p.name, exc)
            continue
        if rec is not None:
            out.append(rec)
    return out


def _pinned(desc: Descriptor) -> Descriptor:
    """What a record keeps of a descriptor (and writes: mount.json's "image")."""
    return Descriptor(desc.media_type, desc.digest, desc.size)


def resolve(store: Store, ref: str) -> Descriptor:
    """The descriptor of image `ref`: a tag or digest the store resolves, else the manifest
    digest (or a unique prefix of 12+ hex digits) a mount record pins."""
    try:
        return store.resolve(ref)
    except ImageNotFound:
        hexpart = ref.removeprefix("sha256:")
        if len(hexpart) < 12:
            raise
        pinned = {
            r.digest: r.image
            for r in all_records(store)
            if r.digest.removeprefix("sha256:").startswith(hexpart)
        }
        if len(pinned) != 1:
            raise
        return next(iter(pinned.values()))


def save(
    store: Store,
    name: str,
    image_name: str,
    image: Descriptor,
    mountpoint: str,
    read_only: bool,
    daemon: dict[str, int] | None = None,
) -> MountRecord:
    """Create or update the record (and for a writable mount its upper/work dirs) for `name`.

    A writable record keeps its image: saving another digest under its name is refused.
    A read-only record has nothing to lose and is replaced."""
    store.require_transaction()
    path = store.mounts / check_name(name)
    old = load(store, name)
    if old is not None and not old.read_only and old.image.digest != image.digest:
        raise StoreError(
            f"mount {name} belongs to image {old.image_name} "
            f"({old.digest[:19]}); use another --name or `layer rm {name}`"
        )
    if old is not None and not old.read_only and read_only:
        raise StoreError(f"mount {name} has an upper; use another --name for a read-only mount")
    path.mkdir(parents=True, exist_ok=True)
    if not read_only:
        (path / "upper").mkdir(exist_ok=True)
        (path / "work").mkdir(exist_ok=True)
    obj: dict[str, Any] = {
        "image_name": image_name,
        "image": _pinned(image).to_json(),
        "mountpoint": mountpoint,
        "read_only": read_only,
    }
    if daemon is not None:
        obj["daemon"] = daemon
    write_atomic(path / "mount.json", json.dumps(obj, indent=2).encode())
    return MountRecord(name, image_name, _pinned(image), mountpoint, read_only, path, daemon)


def remove(store: Store, name: str) -> None:
    store.require_transaction()
    path = store.mounts / check_name(name)
    if not (path / "mount.json").exists():
        raise StoreError(f"no mount named {name}")
    # the record goes first, atomically: a crash half way leaves debris, never a half record
    trash = store.mounts / f".rm-{name}-{os.getpid()}"
    os.rename(path, trash)
    fstree.remove_tree(trash)

"""Writable mounts of images: ROOT/mounts/<name>/{upper,work,mount.json}.

A record names the image (its descriptor, so `gc` keeps its blobs and layers) and the last
mountpoint.  The upper survives umount/mount; `remove` deletes it.  Records are written
atomically under the store lock; whether a mount is live is the caller's question (the mount
table), since the store knows nothing of FUSE.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadReference, StoreError
from .store import Store, write_atomic

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class MountRecord:
    name: str
    image_name: str
    image: dict[str, Any]
    mountpoint: str
    read_only: bool
    path: Path

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


def load(store: Store, name: str) -> MountRecord | None:
    path = store.mounts / check_name(name)
    try:
        obj = json.loads((path / "mount.json").read_text())
    except FileNotFoundError:
        return None
    return MountRecord(
        name, obj["image_name"], obj["image"], obj["mountpoint"], obj.get("read_only", False), path
    )


def all_records(store: Store) -> list[MountRecord]:
    out = []
    for p in sorted(store.mounts.iterdir()):
        rec = load(store, p.name) if _NAME.match(p.name) else None
        if rec is not None:
            out.append(rec)
    return out


def save(
    store: Store,
    name: str,
    image_name: str,
    image: dict[str, Any],
    mountpoint: str,
    read_only: bool,
) -> MountRecord:
    """Create or update the record (and its upper/work dirs) for `name`."""
    path = store.mounts / check_name(name)
    old = load(store, name)
    if old is not None and old.image["digest"] != image["digest"]:
        raise StoreError(
            f"mount {name} belongs to image {old.image_name} "
            f"({old.image['digest'][:19]}); use another --name or `layer rm {name}`"
        )
    (path / "upper").mkdir(parents=True, exist_ok=True)
    (path / "work").mkdir(exist_ok=True)
    write_atomic(
        path / "mount.json",
        json.dumps(
            {
                "image_name": image_name,
                "image": image,
                "mountpoint": mountpoint,
                "read_only": read_only,
            },
            indent=2,
        ).encode(),
    )
    return MountRecord(name, image_name, image, mountpoint, read_only, path)


def remove(store: Store, name: str) -> None:
    path = store.mounts / check_name(name)
    if not (path / "mount.json").exists():
        raise StoreError(f"no mount named {name}")
    shutil.rmtree(path)

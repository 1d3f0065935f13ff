"""usage: where the store's disk space goes (`layer df`).

    usage(store) -> Usage

Sizes are disk usage as `du -x -B1` counts it: st_blocks × 512, each inode once (hard links
are counted where first met), never crossing into another filesystem (a live mount's
`merged` dir).  The store root is split into parts that add up to `du -x -B1 ROOT`:
blobs, unpacked layers, uppers (mounts/*/upper), ingest (partial downloads and debris),
and the rest (index, records, work dirs, locks, diffids).
Per image: its blobs and unpacked layers, split into bytes only it uses (unique) and bytes
it shares with another image or mount (shared).  Per mount: its upper.
From the fingerprints: bytes of regular files that another layer holds identically (the same
content digest, size, mode, owner, mtime and xattrs), which a deduplicating store could keep
once.  Layers without fingerprints are counted as such and left out of that figure.
Reads only; single-threaded.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fingerprints, media, mountrecords
from .errors import StoreError
from .store import Store


@dataclass
class Usage:
    parts: dict[str, int] = field(default_factory=dict)  # blobs, layers, uppers, ingest, other
    total: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    duplicate_files: int = 0
    duplicate_bytes: int = 0
    layers_without_fingerprints: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "total": self.total,
            "images": self.images,
            "mounts": self.mounts,
            "dedup": {
                "duplicate_files": self.duplicate_files,
                "duplicate_bytes": self.duplicate_bytes,
                "layers_without_fingerprints": self.layers_without_fingerprints,
            },
        }


class _Du:
    """du's count: blocks of each inode once, on one filesystem."""

    def __init__(self, dev: int) -> None:
        self.dev = dev
        self.seen: set[int] = set()

    def tree(self, top: Path) -> int:
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            return 0
        total = self._one(st)
        if not stat.S_ISDIR(st.st_mode) or st.st_dev != self.dev:
            return total
        stack = [os.fsencode(top)]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    try:
                        est = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if est.st_dev != self.dev:
                        continue  # a mount on top (du -x)
                    total += self._one(est)
                    if stat.S_ISDIR(est.st_mode):
                        stack.append(e.path)
        return total

    def _one(self, st: os.stat_result) -> int:
        if st.st_dev != self.dev or st.st_ino in self.seen:
            return 0
        self.seen.add(st.st_ino)
        return st.st_blocks * 512


def usage(store: Store) -> Usage:
    u = Usage()
    du = _Du(os.lstat(store.root).st_dev)
    layer_sizes = {p.name: du.tree(p) for p in sorted(store.layers.iterdir())}
    blob_sizes = {p.name: du.tree(p) for p in sorted(store.blobs.iterdir())}
    u.parts["layers"] = sum(layer_sizes.values()) + du.tree(store.layers)
    u.parts["blobs"] = sum(blob_sizes.values()) + du.tree(store.root / "blobs")
    records = mountrecords.all_records(store, on_damaged=lambda name, exc: None)  # fsck says
    uppers = {}
    for rec in records:
        if not rec.read_only:
            uppers[rec.name] = du.tree(rec.upper)
    u.parts["uppers"] = sum(uppers.values())
    u.parts["ingest"] = du.tree(store.ingest_dir)
    u.parts["other"] = du.tree(store.root)  # all that is left, once each
    u.total = sum(u.parts.values())
    users = _users(store, records)
    for name, (blobs, layers) in users.items():
        if name.startswith("mount:"):
            continue
        u.images.append(_image_usage(name, blobs, layers, users, blob_sizes, layer_sizes))
    for rec in records:
        u.mounts.append(
            {
                "name": rec.name,
                "image": rec.image_name,
                "upper": uppers.get(rec.name, 0),
                "read_only": rec.read_only,
            }
        )
    _duplicates(store, u)
    return u


def _users(
    store: Store, records: list[mountrecords.MountRecord]
) -> dict[str, tuple[set[str], set[str]]]:
    """image name (or "mount:NAME") → (blob hexes, layer hexes) it uses."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    descs = [(n, d) for n, d in store.images()]
    descs += [(f"mount:{r.name}", r.image) for r in records]
    for name, desc in descs:
        try:
            data = store.read_blob(desc.digest, verify=False)
            m = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
            ids = media.diff_ids(store.read_blob(m.config.digest, verify=False))
        except (StoreError, KeyError):
            out[name] = ({desc.digest.hex}, set())
            continue
        blobs = {desc.digest.hex, m.config.digest.hex, *(x.digest.hex for x in m.layers)}
        out[name] = (blobs, {d.hex for d in ids})
    return out


def _image_usage(
    name: str,
    blobs: set[str],
    layers: set[str],
    users: dict[str, tuple[set[str], set[str]]],
    blob_sizes: dict[str, int],
    layer_sizes: dict[str, int],
) -> dict[str, Any]:
    others_b = set().union(*(b for n, (b, _) in users.items() if n != name))
    others_l = set().union(*(lay for n, (_, lay) in users.items() if n != name))
    unique = sum(blob_sizes.get(b, 0) for b in blobs - others_b)
    unique += sum(layer_sizes.get(x, 0) for x in layers - others_l)
    shared = sum(blob_sizes.get(b, 0) for b in blobs & others_b)
    shared += sum(layer_sizes.get(x, 0) for x in layers & others_l)
    return {"name": name, "unique": unique, "shared": shared, "layers": len(layers)}


def _duplicates(store: Store, u: Usage) -> None:
    seen: set[tuple[Any, ...]] = set()
    for p in sorted(store.layers.iterdir()):
        if p.name.startswith(".") or not (p / "complete").exists():
            continue
        try:
            entries = list(fingerprints.read(p / fingerprints.FILE_NAME))
        except (FileNotFoundError, fingerprints.FingerprintsDamaged):
            u.layers_without_fingerprints += 1
            continue
        for e in entries:
            if not stat.S_ISREG(e.mode) or e.link or e.size == 0:
                continue  # a second name of one inode is no duplicate
            key = (e.digest, e.size, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)
            if key in seen:
                u.duplicate_files += 1
                u.duplicate_bytes += e.size
            else:
                seen.add(key)

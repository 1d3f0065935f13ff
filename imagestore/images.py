"""What the store holds: image summaries, inspection, removal of names, garbage collection.

Reads index.json and blobs; `gc` deletes blobs and unpacked layers that no tagged image and
no mount record pins (read-only mounts included).  Mutating calls (`remove`, `gc`) run under
the store lock.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from . import fstree, media, mountrecords
from .digest import Digest
from .store import REF_ANNOTATION, Store
from .unpack import remove_tree


@dataclass
class ImageInfo:
    name: str
    digest: Digest
    media_type: str
    size: int  # manifest + config + layer blobs, as stored
    layers: int
    created: str | None


def _manifest(store: Store, desc: media.Descriptor) -> tuple[bytes, media.Manifest]:
    data = store.read_blob(desc.digest)
    return data, media.parse_manifest(data, media.media_type_of(data, desc.media_type))


def info(store: Store, name: str) -> ImageInfo:
    desc = store.resolve(name)
    data, m = _manifest(store, desc)
    config = store.read_json(m.config.digest)
    size = len(data) + m.config.size + sum(layer.size for layer in m.layers)
    label = desc.annotations.get(REF_ANNOTATION, name)
    return ImageInfo(
        label,
        desc.digest,
        m.media_type,
        size,
        len(m.layers),
        config.get("created"),
    )


def list_images(store: Store) -> list[ImageInfo]:
    return [info(store, name) for name, _ in store.images()]


def inspect(store: Store, name: str) -> dict[str, Any]:
    desc = store.resolve(name)
    data, m = _manifest(store, desc)
    config = store.read_json(m.config.digest)
    diff_ids = media.diff_ids(json.dumps(config).encode())
    return {
        "name": desc.annotations.get(REF_ANNOTATION, name),
        "digest": str(desc.digest),
        "mediaType": m.media_type,
        "manifest": json.loads(data),
        "config": config,
        "layers": [
            {
                "digest": str(layer.digest),
                "diffID": str(d),
                "mediaType": layer.media_type,
                "size": layer.size,
                "unpacked": str(store.layer_dir(d)) if store.has_layer(d) else None,
            }
            for layer, d in zip(m.layers, diff_ids, strict=True)
        ],
    }


def raw_manifest(store: Store, name: str) -> bytes:
    return store.read_blob(store.resolve(name).digest)


def referenced(store: Store) -> tuple[set[Digest], set[Digest]]:
    """(blobs, diff ids) that tagged images and mounts keep alive."""
    blobs: set[Digest] = set()
    layers: set[Digest] = set()
    descs = [d for _, d in store.images()]
    # a damaged record raises (StoreError naming it): gc must not drop the image it pins
    descs += [rec.image for rec in mountrecords.all_records(store)]
    for desc in descs:
        try:
            data, m = _manifest(store, desc)
        except Exception:  # noqa: BLE001 - a broken image keeps what it names, no more
            continue
        blobs |= {desc.digest, m.config.digest, *(x.digest for x in m.layers)}
        if store.has_blob(m.config.digest):
            layers |= set(media.diff_ids(store.read_blob(m.config.digest)))
    return blobs, layers


def gc(store: Store) -> tuple[int, int, int]:
    """Remove what nothing references; returns (blobs removed, layers removed, bytes freed)."""
    with store.collecting(), store.transaction():
        blobs, layers = referenced(store)
        nblobs = nlayers = freed = 0
        kept_blobs = {d.hex for d in blobs}
        kept_layers = {d.hex for d in layers}
        for path in store.blobs.iterdir():
            if path.name not in kept_blobs:  # by name: a stray file is no digest, and goes
                freed += path.stat().st_size
                path.unlink()
                (store.diffids / path.name).unlink(missing_ok=True)
                nblobs += 1
        for path in store.layers.iterdir():
            if path.name.startswith("."):
                remove_tree(path)  # debris of an interrupted unpack
                continue
            if path.name not in kept_layers:
                freed += _du(path)
                fstree.remove_tree(path)
                nlayers += 1
        for path in store.ingest_dir.iterdir():  # debris: nobody writes while we collect
            if path.is_dir() and not path.is_symlink():  # a `commit --verify` scratch dir
                freed += _du(path)
                remove_tree(path)
            else:
                freed += path.lstat().st_size
                path.unlink()
        return nblobs, nlayers, freed


def _du(path: Any) -> int:
    """Bytes in the regular files of a tree (iterative; what cannot be reached, a path past
    PATH_MAX, is not counted: the figure is for the report only)."""
    total, stack = 0, [os.fsencode(path)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total

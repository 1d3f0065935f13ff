"""pull: bring an image from any source into the store, verified, unpacked and tagged.

Steps: the source's manifest (an index is resolved for the platform), the config, every
layer blob — downloads run concurrently, each verified while streaming and resumable, and
each unpacked while it downloads (`unpack.fetch_and_unpack`; the layer is published only once
blob digest and DiffID check out) — once per store (shared with every image that has it; a
layer already unpacked is neither downloaded again nor re-extracted), the manifest stored, and
the tag written last under the store lock.  An interrupted pull leaves no tag and no half
blob: partial downloads stay in ingest/ to be resumed, never in blobs/.

Threads: a pool of `jobs` workers downloads layers, each unpacked meanwhile by a forked process
(module unpacker; the applier and, in a thread, the decompression ahead of it); the tag is
written by the calling thread.  `report` callbacks are called from worker threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import media
from .digest import Digest
from .errors import StoreError
from .media import BadManifest, Descriptor
from .store import Store, check_tag_name
from .unpack import fetch_and_unpack, unpack_layer, verify_diff_id

if TYPE_CHECKING:  # sources (and its transports) only where a pull runs: not for a mount
    from .sources import Source


class Reporter(Protocol):
    def layer(self, index: int, desc: Descriptor, state: str) -> None: ...

    def progress(self, index: int, done: int, total: int | None) -> None: ...


@dataclass
class PullResult:
    name: str
    manifest_digest: Digest
    media_type: str
    diff_ids: list[Digest] = field(default_factory=list)


def pull(
    store: Store,
    text: str,
    *,
    name: str | None = None,
    platform: str | None = None,
    tls_verify: bool = True,
    creds: tuple[str, str] | None = None,
    report: Reporter | None = None,
    jobs: int = 4,
    limits: Any = None,
) -> PullResult:
    """`limits`: an imagestore.transfer.Limits for a registry (stall timeout, deadline)."""
    if name is not None:
        check_tag_name(name)
    from .sources import open_source

    source = open_source(text, tls_verify=tls_verify, creds=creds, limits=limits)
    try:
        with store.in_use():
            name = check_tag_name(name or source.default_name)
            return _pull(store, source, name, platform, report, jobs)
    finally:
        source.close()


def resolve_manifest(source: Source, platform: str | None) -> tuple[bytes, str, Digest]:
    data, announced, digest = source.manifest()
    mt = media.media_type_of(data, announced)
    if mt in media.INDEX_TYPES:
        entry = media.choose_platform(media.index_entries(data), platform)
        data, announced, digest = source.manifest(str(entry.digest))
        mt = media.media_type_of(data, entry.media_type)
        if digest != entry.digest:
            raise BadManifest(f"index names {entry.digest} but the source gave {digest}")
    return data, mt, digest


def _pull(
    store: Store,
    source: Source,
    name: str,
    platform: str | None,
    report: Reporter | None,
    jobs: int,
) -> PullResult:
    from .sources import DockerArchiveSource

    if isinstance(source, DockerArchiveSource):
        source.bind(store)
    with _about(name):
        data, mt, digest = resolve_manifest(source, platform)
    with _about(f"{name}: manifest {digest}"):
        manifest = media.parse_manifest(data, mt)
    source.fetch_blob(manifest.config, store, None)
    with _about(f"{name}: config {manifest.config.digest}"):
        diff_ids = media.diff_ids(store.read_blob(manifest.config.digest))
    if len(diff_ids) != len(manifest.layers):
        raise BadManifest(f"config lists {len(diff_ids)} layers, manifest {len(manifest.layers)}")

    def one(i: int, desc: Descriptor, diff_id: Digest) -> Digest:
        # every path ends in verify_diff_id: the blob's own DiffID, not the store's word
        if store.has_layer(diff_id) and store.has_blob(desc.digest):
            verify_diff_id(store, desc.digest, desc.media_type, diff_id)
            if report is not None:
                report.layer(i, desc, "already present")
            return diff_id
        if report is not None:
            report.layer(i, desc, "downloading")
        progress = (lambda done, total: report.progress(i, done, total)) if report else None

        def fetch() -> object:  # the store keeps every image's blobs
            return source.fetch_blob(desc, store, progress)

        if store.has_layer(diff_id):
            fetch()
        elif store.has_blob(desc.digest):
            if report is not None:
                report.layer(i, desc, "unpacking")
            unpack_layer(store, desc.digest, desc.media_type, diff_id)
        else:  # unpacked while it downloads
            fetch_and_unpack(store, desc.digest, desc.media_type, diff_id, fetch)
        verify_diff_id(store, desc.digest, desc.media_type, diff_id)
        if report is not None:
            report.layer(i, desc, "done")
        return diff_id

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(one, i, d, diff_ids[i]) for i, d in enumerate(manifest.layers)]
        try:
            got = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    store.put_bytes(data, digest)
    with store.transaction() as txn:
        txn.tag(name, Descriptor(mt, digest, len(data)))
    return PullResult(name, digest, mt, got)


@contextlib.contextmanager
def _about(what: str) -> Iterator[None]:
    """Name the document a BadManifest is about (the user sees which one, and the field)."""
    try:
        yield
    except BadManifest as exc:
        raise BadManifest(f"{what}: {exc}") from None


def image_layers(store: Store, name: str) -> list[Path]:
    """The unpacked layer directories of an image, base first; layers unpacked on demand
    (after a `gc`, say) from blobs still in the store."""
    return descriptor_layers(store, store.resolve(name), name)


def descriptor_layers(store: Store, desc: Descriptor, name: str | None = None) -> list[Path]:
    """`image_layers` of the image a manifest descriptor names, tagged or not (a mount's
    pinned image)."""
    name = name or str(desc.digest)
    data = store.read_blob(desc.digest)
    manifest = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
    diff_ids = media.diff_ids(store.read_blob(manifest.config.digest))
    dirs = []
    for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
        if not store.has_layer(diff_id):
            if not store.has_blob(layer.digest):
                raise StoreError(f"layer {diff_id} of {name} is missing; pull the image again")
            unpack_layer(store, layer.digest, layer.media_type, diff_id)
        dirs.append(store.layer_dir(diff_id))
    return dirs

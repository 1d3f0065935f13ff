"""Where images come from: transports, skopeo-style.

    docker://HOST/NAME[:TAG|@DIGEST], or a plain NAME[:TAG]   a registry (imagestore.registry)
    oci:DIR[:REF]                                            an OCI image layout directory
    oci-archive:FILE[:REF]                                   the same, as a tar file
    docker-archive:FILE[:NAME:TAG]                           `docker save` output

Every source answers the same two questions — "the manifest (or index) for this reference"
and "put this blob in the store, verified" — so `pull` treats them alike.  Blobs from files
are verified exactly like downloads: streamed through a store Ingest that checks digest and
size.  A Source is used by one `pull` at a time; `fetch_blob` may run in several threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from . import media, transports
from .archive import DirFiles, Missing, TarFiles
from .digest import Digest
from .errors import BadArchive, BlobNotFound, DigestMismatch, ImageNotFound
from .media import BadManifest, Descriptor
from .progress import Progress
from .store import REF_ANNOTATION, Store

CHUNK = 1 << 20


class Source(Protocol):
    default_name: str

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        """The top-level manifest or index (ref None), or the one with digest `ref`."""
        ...

    def fetch_blob(self, desc: Descriptor, store: Store, progress: Progress | None) -> Digest: ...

    def close(self) -> None: ...


def open_source(
    text: str,
    *,
    tls_verify: bool = True,
    creds: tuple[str, str] | None = None,
    limits: Any = None,
) -> Source:
    """Parse a transport reference and open its source (registries: no I/O yet).
    `limits` (an imagestore.transfer.Limits) bounds a registry's transfers in time."""
    t = transports.parse(text)
    if t.kind == transports.OCI:
        assert t.path is not None
        return OciLayoutSource(t.path, t.ref)
    if t.kind == transports.OCI_ARCHIVE:
        assert t.path is not None
        return OciArchiveSource(t.path, t.ref)
    if t.kind == transports.DOCKER_ARCHIVE:
        assert t.path is not None
        return DockerArchiveSource(t.path, t.ref)
    from .registry_source import RegistrySource  # imports httpx only when needed

    assert t.ref is not None
    return RegistrySource(t.ref, tls_verify=tls_verify, creds=creds, limits=limits)


def copy_verified(
    stream: BinaryIO,
    store: Store,
    expected: Digest | None,
    size: int | None,
    progress: Progress | None = None,
) -> Digest:
    """Stream a blob into the store; digest and size are checked before it becomes visible."""
    if expected is not None and store.has_blob(expected):
        return expected
    done = 0
    with store.ingest(expected, size) as ing:
        while chunk := stream.read(CHUNK):
            ing.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        return ing.commit()


MAX_INDEX = 128 << 20  # an index.json (a layout may hold many images)
MAX_DOCUMENT = 4 << 20  # a manifest or docker-archive manifest.json (containers/image's limit)
MAX_CONFIG = 64 << 20  # an image config
NAMES_SHOWN = 10  # images named in "which one?" errors


class OciLayoutSource:
    """An OCI image layout: a directory (what skopeo copy oci:DIR writes, and our own store)
    or, through `files`, a tar of one (oci-archive:).  Only regular files are read; documents
    are size-bounded and checked field by field (BadManifest naming the file)."""

    def __init__(self, root: Path, ref: str | None, files: DirFiles | TarFiles | None = None):
        self.root = root
        self.ref = ref
        self.files = files or DirFiles(root)
        try:
            index = self.files.read("index.json", MAX_INDEX)
        except Missing:
            raise ImageNotFound(
                f"{self.files.where} is not an OCI image layout (no index.json)"
            ) from None
        try:
            self.entries = media.index_entries(index)
        except BadManifest as exc:
            raise BadManifest(f"{self.files.where}: index.json: {exc}") from None
        self.default_name = ref or root.resolve().name

    def _blob(self, digest: Digest) -> str:
        return f"blobs/{digest.algorithm}/{digest.hex}"

    def _read(self, digest: Digest) -> bytes:
        try:
            data = self.files.read(self._blob(digest), MAX_DOCUMENT)
        except Missing:
            raise BlobNotFound(f"{self.files.where} lacks blob {digest}") from None
        if Digest.of(data) != digest:
            raise DigestMismatch(f"blob {digest} in {self.files.where} is corrupt")
        return data

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        if ref is not None:
            digest = Digest.parse(ref)
            data = self._read(digest)
            return data, media.media_type_of(data), digest
        entries = self.entries
        if self.ref is not None:
            entries = [e for e in entries if e.annotations.get(REF_ANNOTATION) == self.ref]
            if not entries:
                raise ImageNotFound(f"no image {self.ref!r} in {self.files.where}")
        elif len(entries) != 1:
            names = [e.annotations.get(REF_ANNOTATION, str(e.digest)) for e in entries]
            shown = ", ".join(names[:NAMES_SHOWN])
            if len(names) > NAMES_SHOWN:
                shown += f", … ({len(names)} in all)"
            raise ImageNotFound(
                f"{self.files.where} holds {len(entries)} images; name one"
                f"{f' of {shown}' if shown else ''} as :REF"
            )
        desc = entries[-1]
        data = self._read(desc.digest)
        return data, media.media_type_of(data, desc.media_type), desc.digest

    def fetch_blob(self, desc: Descriptor, store: Store, progress: Progress | None) -> Digest:
        if store.has_blob(desc.digest):
            return desc.digest
        try:
            with self.files.open(self._blob(desc.digest)) as f:
                return copy_verified(f, store, desc.digest, desc.size, progress)
        except Missing:
            raise BlobNotFound(f"{self.files.where} lacks blob {desc.digest}") from None

    def close(self) -> None:
        pass


class OciArchiveSource(OciLayoutSource):
    """An OCI layout packed in a tar file, read in place: only what the index references is
    read, streaming (nothing is extracted to disk)."""

    def __init__(self, path: Path, ref: str | None) -> None:
        files = _open_tar(path, "oci-archive")
        try:
            super().__init__(path, ref, files)
        except BaseException:
            files.close()
            raise
        self._tar = files
        self.default_name = ref or path.name.split(".")[0]

    def close(self) -> None:
        self._tar.close()


def _open_tar(path: Path, kind: str) -> TarFiles:
    if not path.is_file():
        raise ImageNotFound(f"{path}: no such file")
    try:
        return TarFiles(path, kind)
    except Missing:
        raise ImageNotFound(f"{path}: no such file") from None


@dataclass(frozen=True)
class _DockerEntry:
    config: str
    layers: list[str]
    tags: list[str]


def _docker_entries(data: bytes, where: str) -> list[_DockerEntry]:
    """manifest.json of a docker-archive, checked (BadArchive naming the entry and field)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadArchive(f"{where}: manifest.json is not JSON: {exc}") from None
    if not isinstance(obj, list):
        raise BadArchive(f"{where}: manifest.json is not a list of images")
    out = []
    for i, e in enumerate(obj):
        at = f"{where}: manifest.json entry {i}"
        if not isinstance(e, dict):
            raise BadArchive(f"{at} is not an object")
        config, layers, tags = e.get("Config"), e.get("Layers"), e.get("RepoTags")
        if not isinstance(config, str):
            raise BadArchive(f"{at}: 'Config' is missing or not a string")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise BadArchive(f"{at}: 'Layers' is not a list of strings")
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
            raise BadArchive(f"{at}: 'RepoTags' is not a list of strings")
        out.append(_DockerEntry(config, layers, tags))
    return out


class DockerArchiveSource:
    """`docker save` output: manifest.json, a Docker config, uncompressed layer tars.

    The archive has no distribution manifest: one is made (Docker schema 2, its layers the
    archive's tars, uncompressed), after the config and layers are copied into the store —
    their digests are known only once read."""

    def __init__(self, path: Path, name: str | None) -> None:
        self.path = path
        self.files = _open_tar(path, "docker-archive")
        try:
            entries = self._entries(name)
        except BaseException:
            self.files.close()
            raise
        self.entry = entries[0]
        tags = self.entry.tags
        self.default_name = name or (tags[0] if tags else path.name.split(".")[0])
        self._made: tuple[bytes, str, Digest] | None = None
        self._store: Store | None = None

    def _entries(self, name: str | None) -> list[_DockerEntry]:
        try:
            data = self.files.read("manifest.json", MAX_DOCUMENT)
        except Missing:
            raise BadArchive(f"{self.files.where} lacks manifest.json") from None
        entries = _docker_entries(data, self.files.where)
        if name is not None:
            entries = [e for e in entries if name in e.tags]
            if not entries:
                raise ImageNotFound(f"no image {name!r} in {self.path}")
        if not entries:
            raise ImageNotFound(f"{self.path} holds no image")
        return entries

    def bind(self, store: Store) -> None:
        self._store = store

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        if self._made is not None:
            return self._made
        store = self._store
        if store is None:
            raise RuntimeError("DockerArchiveSource.bind(store) first")
        try:
            config = self.files.read(self.entry.config, MAX_CONFIG)
            config_digest = store.put_bytes(config)
            layers = []
            for name in self.entry.layers:
                size = self.files.size(name)
                with self.files.open(name) as f:
                    digest = copy_verified(f, store, None, size)
                layers.append(
                    {"mediaType": media.DOCKER_LAYER, "size": size, "digest": str(digest)}
                )
        except Missing as exc:
            raise BadArchive(str(exc)) from None
        manifest = {
            "schemaVersion": 2,
            "mediaType": media.DOCKER_MANIFEST,
            "config": {
                "mediaType": media.DOCKER_CONFIG,
                "size": len(config),
                "digest": str(config_digest),
            },
            "layers": layers,
        }
        data = json.dumps(manifest, indent=3).encode()
        self._made = (data, media.DOCKER_MANIFEST, Digest.of(data))
        return self._made

    def fetch_blob(self, desc: Descriptor, store: Store, progress: Progress | None) -> Digest:
        if not store.has_blob(desc.digest):
            raise BlobNotFound(f"{desc.digest} should have been imported from {self.path}")
        if progress is not None:
            progress(desc.size, desc.size)
        return desc.digest

    def close(self) -> None:
        self.files.close()

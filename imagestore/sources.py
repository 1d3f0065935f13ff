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
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from . import media
from .digest import Digest
from .errors import BadReference, BlobNotFound, ImageNotFound
from .media import Descriptor
from .store import REF_ANNOTATION, Store

Progress = Callable[[int, int | None], None]
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
    if text.startswith("oci:"):
        path, _, ref = text[4:].partition(":")
        return OciLayoutSource(Path(path), ref or None)
    if text.startswith("oci-archive:"):
        path, _, ref = text[len("oci-archive:") :].partition(":")
        return OciArchiveSource(Path(path), ref or None)
    if text.startswith("docker-archive:"):
        path, _, name = text[len("docker-archive:") :].partition(":")
        return DockerArchiveSource(Path(path), name or None)
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    elif "://" in text or text.split(":", 1)[0] in ("dir", "containers-storage", "docker-daemon"):
        raise BadReference(
            f"unsupported transport in {text!r} (use docker://, oci:, "
            "oci-archive: or docker-archive:)"
        )
    from .registry_source import RegistrySource  # imports httpx only when needed

    return RegistrySource(text, tls_verify=tls_verify, creds=creds, limits=limits)


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


class OciLayoutSource:
    """An OCI image layout directory (what skopeo copy oci:DIR writes, and our own store)."""

    def __init__(self, root: Path, ref: str | None) -> None:
        self.root = root
        self.ref = ref
        if not (root / "index.json").is_file():
            raise ImageNotFound(f"{root} is not an OCI image layout (no index.json)")
        self.default_name = ref or root.resolve().name

    def _blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def _read(self, digest: Digest) -> bytes:
        try:
            data = self._blob(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"{self.root} lacks blob {digest}") from None
        if Digest.of(data) != digest:
            from .errors import DigestMismatch

            raise DigestMismatch(f"blob {digest} in {self.root} is corrupt")
        return data

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        if ref is not None:
            digest = Digest.parse(ref)
            data = self._read(digest)
            return data, media.media_type_of(data), digest
        index = media.load((self.root / "index.json").read_bytes())
        entries = index.get("manifests", [])
        if self.ref is not None:
            entries = [
                e for e in entries if (e.get("annotations") or {}).get(REF_ANNOTATION) == self.ref
            ]
            if not entries:
                raise ImageNotFound(f"no image {self.ref!r} in {self.root}")
        elif len(entries) != 1:
            names = [
                (e.get("annotations") or {}).get(REF_ANNOTATION, e.get("digest")) for e in entries
            ]
            raise ImageNotFound(
                f"{self.root} holds {len(entries)} images; name one of "
                f"{', '.join(map(str, names))} as oci:{self.root}:REF"
            )
        desc = Descriptor.from_json(entries[-1])
        data = self._read(desc.digest)
        return data, media.media_type_of(data, desc.media_type), desc.digest

    def fetch_blob(self, desc: Descriptor, store: Store, progress: Progress | None) -> Digest:
        try:
            with open(self._blob(desc.digest), "rb") as f:
                return copy_verified(f, store, desc.digest, desc.size, progress)
        except FileNotFoundError:
            raise BlobNotFound(f"{self.root} lacks blob {desc.digest}") from None

    def close(self) -> None:
        pass


class OciArchiveSource(OciLayoutSource):
    """An OCI layout packed in a tar file: unpacked (safely) to a temp dir first."""

    def __init__(self, path: Path, ref: str | None) -> None:
        if not path.is_file():
            raise ImageNotFound(f"{path}: no such file")
        self._tmp = Path(tempfile.mkdtemp(prefix="layer-oci-archive-"))
        try:
            with tarfile.open(path) as tf:
                tf.extractall(self._tmp, filter="data")
            super().__init__(self._tmp, ref)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self.default_name = ref or path.name.split(".")[0]

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class DockerArchiveSource:
    """`docker save` output: manifest.json, a Docker config, uncompressed layer tars.

    The archive has no distribution manifest: one is made (Docker schema 2, its layers the
    archive's tars, uncompressed), after the config and layers are copied into the store —
    their digests are known only once read."""

    def __init__(self, path: Path, name: str | None) -> None:
        if not path.is_file():
            raise ImageNotFound(f"{path}: no such file")
        self.path = path
        try:
            self.tar = tarfile.open(path)
        except tarfile.TarError as exc:
            raise ImageNotFound(f"{path} is not a docker-archive: {exc}") from None
        entries = json.loads(self._member("manifest.json").read())
        if name is not None:
            entries = [e for e in entries if name in (e.get("RepoTags") or [])]
            if not entries:
                raise ImageNotFound(f"no image {name!r} in {path}")
        if not entries:
            raise ImageNotFound(f"{path} holds no image")
        self.entry: dict[str, Any] = entries[0]
        tags = self.entry.get("RepoTags") or []
        self.default_name = name or (tags[0] if tags else path.name.split(".")[0])
        self._made: tuple[bytes, str, Digest] | None = None
        self._store: Store | None = None

    def _member(self, name: str) -> BinaryIO:
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise ImageNotFound(f"{self.path} lacks {name}")
        return f  # type: ignore[return-value]

    def bind(self, store: Store) -> None:
        self._store = store

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        if self._made is not None:
            return self._made
        store = self._store
        if store is None:
            raise RuntimeError("DockerArchiveSource.bind(store) first")
        config_name = self.entry["Config"]
        config = self._member(config_name).read()
        config_digest = store.put_bytes(config)
        layers = []
        for name in self.entry.get("Layers", []):
            member = self.tar.getmember(name)
            digest = copy_verified(self._member(name), store, None, member.size)
            layers.append(
                {"mediaType": media.DOCKER_LAYER, "size": member.size, "digest": str(digest)}
            )
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
        self.tar.close()

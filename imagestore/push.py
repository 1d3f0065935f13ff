"""push: copy an image from the store to a registry or into image files.

    docker://HOST/REPO[:TAG], or a plain reference   blobs first (each skipped when the registry
                                                     has it, mounted from `from_repo` when it
                                                     can be, uploaded otherwise), manifest last
    oci:DIR[:REF]                                    an OCI image layout, created or extended
    oci-archive:FILE[:REF]                           the same, as a tar file
    docker-archive:FILE[:NAME:TAG]                   `docker save` output (uncompressed layers)

What it promises: the manifest is pushed (or named in index.json) only after every blob it
refers to is in place, with its exact stored bytes and media type, so the destination's digest
is the store's.  Blobs copied into files are verified while copied; layers written to a
docker-archive are decompressed and checked against the config's DiffIDs.  Files are written
atomically (temp name, fsync, rename): an interrupted push leaves the old file or the new one,
and an OCI layout whose index.json never names a half-copied blob.
Concurrency: push only reads the store and takes no lock (blobs are immutable; a `gc` removing
the image meanwhile makes the push fail with BlobNotFound, never send a wrong blob).  Registry
blobs are pushed by `jobs` threads; `report` callbacks come from those threads.  Two pushes
into the same OCI layout at once are not serialised (the last index.json write wins).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from . import compression, media, transports, upload
from .digest import Digest
from .durable import AtomicFile, write_atomic
from .errors import BadReference, BlobNotFound, CorruptLayer, DigestMismatch, StoreError
from .media import BadManifest, Descriptor, Manifest
from .pull import Reporter
from .reference import DEFAULT_TAG, parse_reference
from .store import OCI_LAYOUT, REF_ANNOTATION, Store

CHUNK = 1 << 20


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


@dataclass(frozen=True)
class _Image:
    """An image read from the store: its manifest's bytes, type, digest and parsed form."""

    data: bytes
    media_type: str
    digest: Digest
    manifest: Manifest

    @property
    def blobs(self) -> list[Descriptor]:
        """Layers, then the config: the order in which `report` numbers them."""
        return [*self.manifest.layers, self.manifest.config]


def push(
    store: Store,
    image: str,
    dest: str,
    *,
    tls_verify: bool = True,
    creds: tuple[str, str] | None = None,
    report: Reporter | None = None,
    from_repo: str | None = None,
    threshold: int = upload.DEFAULT_THRESHOLD,
    chunk_size: int = upload.DEFAULT_CHUNK_SIZE,
    jobs: int = 4,
) -> Digest:
    """Push store image `image` to `dest` (a transport reference); returns the manifest digest.

    `from_repo`: the repository on the destination registry the image came from, for
    cross-repository mounts; by default the image's own name when it names that registry."""
    img = _load(store, image)
    for desc in img.blobs:
        if not store.has_blob(desc.digest):
            raise BlobNotFound(f"{image}: blob {desc.digest} is not in the store; cannot push")
    t = transports.parse(dest)
    if t.kind == transports.OCI:
        assert t.path is not None
        _to_layout(store, img, t.path, t.ref, report)
    elif t.kind == transports.OCI_ARCHIVE:
        assert t.path is not None
        _to_oci_archive(store, img, t.path, t.ref, report)
    elif t.kind == transports.DOCKER_ARCHIVE:
        assert t.path is not None
        _to_docker_archive(store, img, t.path, t.ref or _default_repo_tag(image), report)
    else:
        assert t.ref is not None
        opts = _RegistryPush(tls_verify, creds, report, from_repo, jobs, threshold, chunk_size)
        _to_registry(store, img, t.ref, image, opts)
    return img.digest


def _load(store: Store, image: str) -> _Image:
    desc = store.resolve(image)
    digest = desc.digest
    data = store.read_blob(digest)
    mt = media.media_type_of(data, desc.media_type)
    if mt in media.INDEX_TYPES:
        raise BadManifest(f"{image} is an image index; pushing indexes is not supported")
    return _Image(data, mt, digest, media.parse_manifest(data, mt))


def _state(report: Reporter | None, i: int, desc: Descriptor, state: str) -> None:
    if report is not None:
        report.layer(i, desc, state)


# ----- docker:// ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _RegistryPush:
    """How `_to_registry` pushes (push()'s keyword arguments, in one value)."""

    # verify the registry's certificate (skopeo --tls-verify)
    tls_verify: bool
    # (user, password), else LAYER_CREDS or the auth files
    creds: tuple[str, str] | None
    # per-blob states and byte progress, from the worker threads
    report: Reporter | None
    # the repository on the same registry to mount blobs from; None: guessed from the name
    from_repo: str | None
    # blobs uploaded at once
    jobs: int
    # blobs up to this size go in one PUT, larger ones in chunks of chunk_size (upload.py)
    threshold: int
    chunk_size: int


def _to_registry(store: Store, img: _Image, text: str, image: str, o: _RegistryPush) -> None:
    from .registry import RegistryClient  # imports httpx only when needed

    tls_verify, creds, report, from_repo, jobs = (
        o.tls_verify,
        o.creds,
        o.report,
        o.from_repo,
        o.jobs,
    )

    ref = parse_reference(text)
    if ref.digest is not None:
        raise BadReference(f"push to a tag, not a digest: {text!r}")
    tag = ref.tag or DEFAULT_TAG
    if from_repo is None:
        from_repo = _source_repo(image, ref.host)
    with RegistryClient(ref.host, tls_verify=tls_verify, creds=creds) as client:

        def one(i: int, desc: Descriptor) -> str:
            _state(report, i, desc, "checking")
            progress = (lambda done, total: report.progress(i, done, total)) if report else None
            state = upload.push_blob(
                client,
                ref.repository,
                desc.digest,
                desc.size,
                lambda: store.open_blob(desc.digest),
                from_repo=from_repo,
                threshold=o.threshold,
                chunk_size=o.chunk_size,
                progress=progress,
            )
            _state(report, i, desc, state)
            return state

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = [pool.submit(one, i, d) for i, d in enumerate(img.blobs)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        got = upload.put_manifest(client, ref.repository, tag, img.data, img.media_type)
    if got != img.digest:
        raise DigestMismatch(f"the registry stored the manifest as {got}, not {img.digest}")


def _source_repo(image: str, host: str) -> str | None:
    """The repository `image` was pulled from, when its name says it is on `host`."""
    try:
        ref = parse_reference(image)
    except StoreError:
        return None
    return ref.repository if ref.host == host else None


# ----- oci: and oci-archive: ---------------------------------------------------------------
def _to_layout(
    store: Store, img: _Image, root: Path, ref: str | None, report: Reporter | None
) -> None:
    """Create or extend the OCI layout `root`; `ref` replaces an older image of that name."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if not (root / "oci-layout").exists():
        write_atomic(root / "oci-layout", json.dumps(OCI_LAYOUT).encode())
    for i, desc in enumerate(img.blobs):
        _state(report, i, desc, "copying")
        _copy_blob(store, desc, blobs)
        _state(report, i, desc, "done")
    top = Descriptor(media_type=img.media_type, digest=img.digest, size=len(img.data))
    _copy_blob(store, top, blobs)
    index_path = root / "index.json"
    if index_path.exists():
        data = index_path.read_bytes()
        try:
            media.index_entries(data)  # every entry a descriptor, before we rewrite it
        except BadManifest as exc:
            raise BadManifest(f"{index_path}: {exc}") from None
        index = media.load(data)
    else:
        index = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": []}
    entry = top.to_json()
    if ref is not None:
        entry["annotations"] = {REF_ANNOTATION: ref}
    index["manifests"] = [e for e in index.get("manifests") or [] if not _same_name(e, entry)]
    index["manifests"].append(entry)
    write_atomic(index_path, json.dumps(index, indent=2).encode() + b"\n")


def _same_name(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """An index entry the new one replaces: the same ref name, or both unnamed and equal."""
    old_ref = (old.get("annotations") or {}).get(REF_ANNOTATION)
    new_ref = (new.get("annotations") or {}).get(REF_ANNOTATION)
    if new_ref is not None:
        return bool(old_ref == new_ref)
    return old_ref is None and old.get("digest") == new["digest"]


def _copy_blob(store: Store, desc: Descriptor, blobs: Path) -> None:
    """Copy a store blob into `blobs/`, verified; an existing blob of the right size stays."""
    dest = blobs / desc.digest.hex
    if dest.is_file() and dest.stat().st_size == desc.size:
        return
    try:
        with (
            store.open_blob(desc.digest) as src,
            AtomicFile(dest, expected=desc.digest, size=desc.size) as out,
        ):
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except DigestMismatch:
        raise DigestMismatch(f"blob {desc.digest} in the store is corrupt") from None


def _to_oci_archive(
    store: Store, img: _Image, path: Path, ref: str | None, report: Reporter | None
) -> None:
    with tempfile.TemporaryDirectory(prefix=".layer-oci-", dir=path.parent or ".") as tmp:
        layout = Path(tmp) / "layout"
        _to_layout(store, img, layout, ref, report)
        with AtomicFile(path) as f, tarfile.open(fileobj=f.file, mode="w") as tf:
            for name in ("oci-layout", "index.json", "blobs", "blobs/sha256"):
                tf.add(layout / name, arcname=name, recursive=False, filter=_plain)
            for blob in sorted((layout / "blobs" / "sha256").iterdir()):
                tf.add(blob, arcname=f"blobs/sha256/{blob.name}", filter=_plain)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ----- docker-archive: ---------------------------------------------------------------------
def _default_repo_tag(image: str) -> str | None:
    """`NAME:TAG` for RepoTags, from the store name when it is a reference."""
    try:
        ref = parse_reference(image)
    except StoreError:
        return None
    return f"{ref.name}:{ref.tag or DEFAULT_TAG}"


def _to_docker_archive(
    store: Store, img: _Image, path: Path, repo_tag: str | None, report: Reporter | None
) -> None:
    config = store.read_blob(img.manifest.config.digest)
    diff_ids = media.diff_ids(config)
    if len(diff_ids) != len(img.manifest.layers):
        raise BadManifest(
            f"config lists {len(diff_ids)} layers, manifest {len(img.manifest.layers)}"
        )
    config_name = f"{img.manifest.config.digest.hex}.json"
    names = [f"{d.hex}/layer.tar" for d in diff_ids]
    entry = {"Config": config_name, "RepoTags": [repo_tag] if repo_tag else [], "Layers": names}
    with (
        tempfile.TemporaryDirectory(prefix=".layer-save-", dir=path.parent or ".") as tmp,
        AtomicFile(path) as f,
        tarfile.open(fileobj=f.file, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        written: set[str] = set()
        for i, (desc, diff_id) in enumerate(zip(img.manifest.layers, diff_ids, strict=True)):
            _state(report, i, desc, "decompressing")
            if diff_id.hex not in written:
                plain = Path(tmp) / "layer.tar"
                _decompress(store, desc, diff_id, plain)
                _add_dir(tf, diff_id.hex)
                tf.add(plain, arcname=f"{diff_id.hex}/layer.tar", filter=_plain)
                plain.unlink()
                written.add(diff_id.hex)
            _state(report, i, desc, "done")
        _add_bytes(tf, config_name, config)
        _add_bytes(tf, "manifest.json", json.dumps([entry]).encode())


def _decompress(store: Store, desc: Descriptor, diff_id: Digest, out_path: Path) -> None:
    """Write the uncompressed tar of layer `desc` to `out_path`; its sha256 must be `diff_id`."""
    hasher = diff_id.hasher()
    with store.open_blob(desc.digest) as raw, open(out_path, "wb") as out:
        with _uncompressed(raw) as src:
            try:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            except (EOFError, OSError, zstandard.ZstdError) as exc:
                raise CorruptLayer(f"layer {desc.digest}: cannot decompress: {exc}") from None
    if Digest.from_hash(hasher) != diff_id:
        raise DigestMismatch(
            f"layer {desc.digest} decompresses to {Digest.from_hash(hasher)}, "
            f"but the config says {diff_id}"
        )


@contextlib.contextmanager
def _uncompressed(raw: BinaryIO) -> Iterator[_Readable]:
    """A reader of the plain tar: compression by magic bytes (media types can lie)."""
    kind = compression.sniff(raw.read(compression.SNIFF_BYTES))
    raw.seek(0)
    if kind == compression.GZIP:
        with gzip.GzipFile(fileobj=raw, mode="rb") as g:
            yield g
    elif kind == compression.ZSTD:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(raw, read_across_frames=True) as z:
            yield z
    else:
        yield raw


def _add_dir(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tf.addfile(info)


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tf.addfile(info, io.BytesIO(data))

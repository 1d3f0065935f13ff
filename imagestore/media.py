"""Media types and the parsing of manifests, indexes and configs (OCI and Docker flavours).

Pure functions over JSON bytes; no I/O, no state.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import ImageNotFound, StoreError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


class BadManifest(StoreError):
    """A manifest, index or config that does not parse or lacks what it must hold."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                obj["mediaType"],
                Digest.parse(obj["digest"]),
                int(obj["size"]),
                obj.get("platform"),
                obj.get("annotations") or {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadManifest(f"bad descriptor {obj!r}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


def load(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise BadManifest(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadManifest("not a JSON object")
    return obj


def media_type_of(data: bytes, announced: str | None = None) -> str:
    """The type a document says it is (its own mediaType wins over a transport's header)."""
    obj = load(data)
    mt = obj.get("mediaType") or announced
    if not mt:
        mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    return str(mt)


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    obj = load(data)
    if media_type not in MANIFEST_TYPES:
        raise BadManifest(f"unsupported manifest type {media_type}")
    try:
        config = Descriptor.from_json(obj["config"])
        layers = [Descriptor.from_json(layer) for layer in obj.get("layers", [])]
    except KeyError as exc:
        raise BadManifest(f"manifest lacks {exc}") from None
    return Manifest(media_type, config, layers)


def index_entries(data: bytes) -> list[Descriptor]:
    return [Descriptor.from_json(m) for m in load(data).get("manifests", [])]


def this_platform() -> str:
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm/v7",
        "armv6l": "arm/v6",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)
    return f"linux/{arch}"


def choose_platform(entries: list[Descriptor], wanted: str | None) -> Descriptor:
    """The index entry for `wanted` (os/arch[/variant]; default: this machine)."""
    want = (wanted or this_platform()).split("/")
    if len(want) < 2:
        raise BadManifest(f"--platform wants os/arch[/variant], not {wanted!r}")
    candidates = []
    for e in entries:
        p = e.platform or {}
        if p.get("os") != want[0] or p.get("architecture") != want[1]:
            continue
        if len(want) > 2 and p.get("variant") != want[2]:
            continue
        candidates.append(e)
    if not candidates:
        have = sorted(
            f"{(e.platform or {}).get('os', '?')}/{(e.platform or {}).get('architecture', '?')}"
            for e in entries
        )
        raise ImageNotFound(
            f"no image for platform {'/'.join(want)} (the index has: "
            f"{', '.join(have) or 'nothing'})"
        )
    return candidates[0]


def diff_ids(config: bytes) -> list[Digest]:
    obj = load(config)
    try:
        return [Digest.parse(d) for d in obj["rootfs"]["diff_ids"]]
    except (KeyError, TypeError) as exc:
        raise BadManifest(f"image config lacks rootfs.diff_ids: {exc}") from None

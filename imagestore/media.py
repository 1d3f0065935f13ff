"""Media types and the parsing of manifests, indexes and configs (OCI and Docker flavours).

Pure functions over JSON bytes; no I/O, no state.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import BadReference, ImageNotFound, StoreError

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


MAX_SIZE = 1 << 62  # a descriptor's size: any real blob, never a float or a bignum


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else f"a {type(value).__name__}"
    )


def _want(obj: dict[str, Any], key: str, typ: type, where: str, required: bool = True) -> Any:
    """obj[key] if it is a `typ` (None when absent and not required); else BadManifest."""
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise BadManifest(f"{where} lacks {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        name = {dict: "an object", list: "a list", str: "a string", int: "an integer"}[typ]
        raise BadManifest(f"{where}: {key!r} is {_kind(value)}, not {name}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadManifest(f"{where} is {_kind(value)}, not an object of strings")
    return value


def _check_platform(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadManifest(f"{where}: 'platform' is {_kind(value)}, not an object")
    for key in ("os", "architecture", "variant", "os.version"):
        _want(value, key, str, f"{where} platform", required=False)
    return value


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str = "descriptor") -> Descriptor:
        """A descriptor checked field by field; BadManifest names `where` and the field."""
        if not isinstance(obj, dict):
            raise BadManifest(f"{where} is {_kind(obj)}, not an object")
        media_type = _want(obj, "mediaType", str, where)
        try:
            digest = Digest.parse(_want(obj, "digest", str, where))
        except BadReference as exc:
            raise BadManifest(f"{where}: {exc}") from None
        size = _want(obj, "size", int, where)
        if not 0 <= size <= MAX_SIZE:
            raise BadManifest(f"{where}: 'size' {size} is out of range")
        return cls(
            media_type,
            digest,
            size,
            _check_platform(obj.get("platform"), where),
            _str_map(obj.get("annotations"), f"{where}: 'annotations'"),
        )

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


def load(data: bytes, what: str = "document") -> dict[str, Any]:
    """A JSON object (BadManifest for anything else: not JSON, an array, a number...)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadManifest(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadManifest(f"{what} is {_kind(obj)}, not a JSON object")
    return obj


def media_type_of(data: bytes, announced: str | None = None) -> str:
    """The type a document says it is (its own mediaType wins over a transport's header)."""
    obj = load(data)
    mt = _want(obj, "mediaType", str, "document", required=False) or announced
    if not mt:
        mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    return str(mt)


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    obj = load(data, "manifest")
    if media_type not in MANIFEST_TYPES:
        raise BadManifest(f"unsupported manifest type {media_type}")
    config = Descriptor.from_json(_want(obj, "config", dict, "manifest"), "manifest config")
    layers = _want(obj, "layers", list, "manifest")
    return Manifest(
        media_type,
        config,
        [Descriptor.from_json(d, f"manifest layer {i}") for i, d in enumerate(layers)],
    )


def index_entries(data: bytes) -> list[Descriptor]:
    obj = load(data, "index")
    entries = _want(obj, "manifests", list, "index", required=False) or []
    return [Descriptor.from_json(m, f"index entry {i}") for i, m in enumerate(entries)]


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
    obj = load(config, "image config")
    rootfs = _want(obj, "rootfs", dict, "image config")
    ids = _want(rootfs, "diff_ids", list, "image config rootfs")
    out = []
    for i, d in enumerate(ids):
        if not isinstance(d, str):
            raise BadManifest(f"image config: diff_ids[{i}] is {_kind(d)}, not a string")
        try:
            out.append(Digest.parse(d))
        except BadReference as exc:
            raise BadManifest(f"image config: diff_ids[{i}]: {exc}") from None
    return out

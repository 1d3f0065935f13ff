"""Images for tests, built with Python's tarfile: OCI layouts and docker-archives.

`layer_tar(entries)` makes one layer tar from a list of (path, kind, payload) entries;
`write_oci_layout(dir, layers, ...)` writes a complete OCI image layout (blobs, config,
manifest, index.json with a ref name), optionally as an index with two platforms, with gzip,
zstd or no compression; `write_docker_archive(file, layers, repo_tag)` writes `docker save`
output.  All deterministic.  `pulled_sample(tmp)` is the sample layout pulled into a new store,
the setup of the tests that mount or commit an image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import zstandard

MTIME = 1_600_000_000


def layer_tar(entries: list[tuple]) -> bytes:
    """entries: (path, kind, payload[, mode]); kind in file/dir/symlink/hardlink/fifo;
    payload = bytes for files, target for links, None otherwise."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            path, kind, payload = entry[:3]
            mode = entry[3] if len(entry) > 3 else (0o755 if kind == "dir" else 0o644)
            info = tarfile.TarInfo(path)
            info.mtime = MTIME
            info.mode = mode
            data = None
            if kind == "file":
                info.type = tarfile.REGTYPE
                data = payload or b""
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


SAMPLE_LAYERS = [
    [
        ("etc/", "dir", None),
        ("etc/passwd", "file", b"root:x:0:0::/root:/bin/sh\n"),
        ("etc/motd", "file", b"old motd\n"),
        ("etc/hostname", "file", b"base\n"),
        ("usr/", "dir", None),
        ("usr/bin/", "dir", None),
        ("usr/bin/tool", "file", b"#!/bin/sh\necho tool\n", 0o755),
        ("usr/bin/tool2", "hardlink", "usr/bin/tool"),
        ("usr/bin/t", "symlink", "tool"),
        ("var/", "dir", None),
        ("var/cache/", "dir", None),
        ("var/cache/a", "file", b"a"),
        ("var/cache/b", "file", b"b"),
        ("run/", "dir", None),
        ("run/fifo", "fifo", None),
        ("opt/gone/", "dir", None),
        ("opt/gone/deep", "file", b"deep"),
    ],
    [
        ("etc/", "dir", None),
        ("etc/.wh.motd", "file", b""),
        ("etc/new.conf", "file", b"new\n"),
        ("var/", "dir", None),
        ("var/cache/", "dir", None),
        ("var/cache/.wh..wh..opq", "file", b""),
        ("var/cache/fresh", "file", b"fresh"),
        ("opt/", "dir", None),
        ("opt/.wh.gone", "file", b""),
    ],
    [
        ("etc/", "dir", None),
        ("etc/hostname", "file", b"top\n"),
        ("srv/", "dir", None),
        ("srv/data", "file", bytes(range(256)) * 64),
    ],
]


def _compress(data: bytes, how: str) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if how == "gzip":
        return gzip.compress(data, mtime=0), base + "+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data), base + "+zstd"
    return data, base


def _put(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}"


def write_oci_layout(
    root: Path,
    layers: list[list[tuple]] = SAMPLE_LAYERS,
    ref: str = "latest",
    compression: str = "gzip",
    platforms: list[str] | None = None,
    docker_types: bool = False,
) -> str:
    """Write an image; returns the digest of what index.json points at."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    manifests = []
    for plat in platforms or ["linux/amd64"]:
        os_, arch = plat.split("/")[:2]
        tars = [
            layer_tar(
                entries + ([(f"{arch}.txt", "file", arch.encode())] if platforms and i == 0 else [])
            )
            for i, entries in enumerate(layers)
        ]
        descs = []
        for t in tars:
            blob, mt = _compress(t, compression)
            if docker_types:
                mt = "application/vnd.docker.image.rootfs.diff.tar.gzip"
            descs.append({"mediaType": mt, "digest": _put(blobs, blob), "size": len(blob)})
        config = json.dumps(
            {
                "created": "2020-09-13T12:26:40Z",
                "architecture": arch,
                "os": os_,
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars],
                },
                "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
            }
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": (
                "application/vnd.docker.distribution.manifest.v2+json"
                if docker_types
                else "application/vnd.oci.image.manifest.v1+json"
            ),
            "config": {
                "mediaType": (
                    "application/vnd.docker.container.image.v1+json"
                    if docker_types
                    else "application/vnd.oci.image.config.v1+json"
                ),
                "digest": _put(blobs, config),
                "size": len(config),
            },
            "layers": descs,
        }
        data = json.dumps(manifest).encode()
        manifests.append(
            {
                "mediaType": manifest["mediaType"],
                "digest": _put(blobs, data),
                "size": len(data),
                "platform": {"os": os_, "architecture": arch},
            }
        )
    if platforms:
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
        data = json.dumps(index).encode()
        top = {"mediaType": index["mediaType"], "digest": _put(blobs, data), "size": len(data)}
    else:
        top = {k: v for k, v in manifests[0].items() if k != "platform"}
    top["annotations"] = {"org.opencontainers.image.ref.name": ref}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return top["digest"]


def write_docker_archive(
    path: Path, layers: list[list[tuple]] = SAMPLE_LAYERS, repo_tag: str = "sample:1"
) -> None:
    tars = [layer_tar(e) for e in layers]
    names = [f"{hashlib.sha256(t).hexdigest()}/layer.tar" for t in tars]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars],
            },
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}])
    with tarfile.open(path, "w") as tf:
        for name, data in [
            *zip(names, tars, strict=True),
            (config_name, config),
            ("manifest.json", manifest.encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = MTIME
            tf.addfile(info, io.BytesIO(data))


def pulled_sample(tmp: Path, **layout_options: object) -> tuple[Any, list[Path]]:
    """The sample image written to tmp/src and pulled into a new store at tmp/store as `base`;
    returns the store and the image's layer dirs (bottom first)."""
    from imagestore.pull import image_layers, pull
    from imagestore.store import Store

    write_oci_layout(tmp / "src", **layout_options)  # type: ignore[arg-type]
    store = Store.open(tmp / "store")
    pull(store, f"oci:{tmp / 'src'}:latest", name="base")
    return store, image_layers(store, "base")

"""Write a single-image OCI layout from layer tars (for samples, benchmarks and tests).

`write_oci_image(root, tars, ref)` writes blobs (gzip-compressed layers without a timestamp,
so the output is reproducible), an image config with the DiffIDs, a manifest and index.json
naming it `ref`.  Returns the manifest digest.  No store involved: plain files, no locking.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from . import media
from .digest import Digest


def write_oci_image(
    root: Path, tars: list[bytes], ref: str, config_extra: dict[str, Any] | None = None
) -> Digest:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = Digest.of(data)
        (blobs / digest.hex).write_bytes(data)
        return {"digest": str(digest), "size": len(data)}

    layers = [{"mediaType": media.OCI_LAYER_GZIP, **put(gzip.compress(t, mtime=0))} for t in tars]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(t)) for t in tars]},
        **(config_extra or {}),
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": media.OCI_CONFIG, **put(json.dumps(config).encode())},
            "layers": layers,
        }
    ).encode()
    top = {
        "mediaType": media.OCI_MANIFEST,
        **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": ref},
    }
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return Digest.of(manifest)

"""Transport references, parsed once for pull (sources.open_source) and push (push.push).

    docker://HOST/NAME[:TAG|@DIGEST]  or a bare reference   a registry (the default)
    oci:DIR[:REF]                                           an OCI image layout
    oci-archive:FILE[:REF]                                  a tar of one
    docker-archive:FILE[:NAME:TAG]                          `docker save` output
skopeo's other transports (`dir:`, `containers-storage:`, `docker-daemon:`) and any other
`SCHEME://` are refused by name, the same way in both directions.  Pure; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BadReference

DOCKER, OCI, OCI_ARCHIVE, DOCKER_ARCHIVE = "docker", "oci", "oci-archive", "docker-archive"
_PATH_TRANSPORTS = (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE)
UNSUPPORTED = ("dir", "containers-storage", "docker-daemon")  # skopeo's, not ours


@dataclass(frozen=True)
class TransportRef:
    kind: str  # DOCKER, OCI, OCI_ARCHIVE or DOCKER_ARCHIVE
    # the file or directory of a path transport; None for DOCKER
    path: Path | None
    # OCI/OCI_ARCHIVE: the REF; DOCKER_ARCHIVE: NAME:TAG; DOCKER: the registry reference.
    # None when a path transport names none.
    ref: str | None


def parse(text: str) -> TransportRef:
    """`text` as a transport reference; BadReference for a transport we do not speak."""
    for kind in _PATH_TRANSPORTS:
        if text.startswith(kind + ":"):
            path, _, ref = text[len(kind) + 1 :].partition(":")
            return TransportRef(kind, Path(path), ref or None)
    rest = text.removeprefix("docker://")
    if "://" in rest or rest.split(":", 1)[0] in UNSUPPORTED:
        raise BadReference(
            f"unsupported transport in {text!r} (use docker://, oci:, "
            "oci-archive: or docker-archive:)"
        )
    return TransportRef(DOCKER, None, rest)

"""Registries for tests: the real `docker-registry`, skopeo, and small fake HTTP servers.

  - `running_registry(workdir, htpasswd=…)` and `skopeo_copy(src, dst, …)` are
    benchmarks/registry.py's (the store benchmark runs the same registry), with a missing tool
    skipping the test, or failing it under CI=true.
  - `SampleImage` / `write_oci_layout` build small OCI images with Python (tarfile, gzip).
  - `FakeServer(respond)` is a threaded `http.server` on 127.0.0.1 that records every request
    and lets a test answer however it likes (drop the connection half way, ignore Range,
    demand Bearer tokens, redirect elsewhere…).  Stopped in `finally` too.
  - `TokenIssuer.create(dir)` makes an RSA key and self-signed certificate with the openssl CLI
    and signs RS256 registry tokens (certificate in `x5c`); `token_auth_config(realm, issuer)`
    is the registry config's `auth` section for them (pass it through `config_hook`).
Under CI=true a missing `docker-registry`, `skopeo` or `htpasswd` fails the test; elsewhere it
skips.
The same goes for `openssl` (TokenIssuer).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks import registry as _real
from benchmarks.registry import STOP_DEADLINE, Registry, free_port  # noqa: F401 (re-exported)
from imagestore.digest import Digest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def require_tool(name: str, package: str) -> str:
    """The tool's path; skip when it is missing, or fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (apt: {package})"
        if IN_CI:
            pytest.fail(f"CI requires this test to run: {why}")
        pytest.skip(why)
    return path


def running_registry(
    workdir: Path,
    *,
    htpasswd: tuple[str, str] | None = None,
    config_hook: Callable[[dict[str, object]], None] | None = None,
) -> contextlib.AbstractContextManager[Registry]:
    """benchmarks.registry.running_registry, a missing tool skipping (failing under CI)."""
    return _real.running_registry(
        workdir, htpasswd=htpasswd, config_hook=config_hook, find=require_tool
    )


def skopeo_copy(src: str, dst: str, *args: str) -> None:
    _real.skopeo_copy(src, dst, *args, find=require_tool)


# ----- small OCI images -------------------------------------------------------------------
@dataclass
class SampleImage:
    layer: bytes
    config: bytes
    manifest: bytes
    arch: str = "amd64"

    @property
    def layer_digest(self) -> Digest:
        return Digest.of(self.layer)

    @property
    def config_digest(self) -> Digest:
        return Digest.of(self.config)

    @property
    def manifest_digest(self) -> Digest:
        return Digest.of(self.manifest)

    def descriptor(self) -> dict[str, object]:
        return {
            "mediaType": OCI_MANIFEST,
            "digest": str(self.manifest_digest),
            "size": len(self.manifest),
            "platform": {"architecture": self.arch, "os": "linux"},
        }


def make_image(files: dict[str, bytes], arch: str = "amd64") -> SampleImage:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
    tar = buf.getvalue()
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(tar))]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": str(Digest.of(config)),
                "size": len(config),
            },
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": str(Digest.of(layer)), "size": len(layer)}
            ],
        }
    ).encode()
    return SampleImage(layer, config, manifest, arch)


def write_oci_layout(
    layout: Path,
    images: dict[str, SampleImage],
    indexes: dict[str, list[SampleImage]] | None = None,
) -> dict[str, bytes]:
    """An OCI layout with each image (and each index of images) under its tag name.

    Returns the bytes of each index blob by tag."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> None:
        (blobs / Digest.of(data).hex).write_bytes(data)

    entries = []
    for tag, img in images.items():
        for data in (img.layer, img.config, img.manifest):
            put(data)
        entries.append({**img.descriptor(), "annotations": _ref(tag)})
    index_bytes = {}
    for tag, imgs in (indexes or {}).items():
        for img in imgs:
            for data in (img.layer, img.config, img.manifest):
                put(data)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [img.descriptor() for img in imgs],
            }
        ).encode()
        put(body)
        index_bytes[tag] = body
        entries.append(
            {
                "mediaType": OCI_INDEX,
                "digest": str(Digest.of(body)),
                "size": len(body),
                "annotations": _ref(tag),
            }
        )
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    )
    return index_bytes


def _ref(tag: str) -> dict[str, str]:
    return {"org.opencontainers.image.ref.name": tag}


# ----- fake servers -----------------------------------------------------------------------
@dataclass
class Seen:
    """One request a FakeServer received."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate small writes
    server: _Server

    def handle(self) -> None:
        # a client probing https on this plain-http port: hang up at once instead of waiting
        with contextlib.suppress(OSError):
            if self.connection.recv(1, socket.MSG_PEEK)[:1] == b"\x16":
                return
        super().handle()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.server.lock:
            self.server.seen.append(seen)
        self.server.respond(self)

    def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drop_after(self, code: int, body: bytes, cut: int, headers: dict[str, str]) -> None:
        """Announce the whole body, send `cut` bytes of it, then hang up."""
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        time.sleep(0.05)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    respond: Callable[[Handler], None]
    seen: list[Seen]
    lock: threading.Lock


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 answering with `respond(handler)`."""

    def __init__(self, respond: Callable[[Handler], None], bind: str = "127.0.0.1") -> None:
        self._server = _Server((bind, 0), Handler)
        self._server.respond = respond
        self._server.seen = []
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        addr, port = self._server.server_address[:2]
        return f"{addr!s}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def seen(self) -> list[Seen]:
        with self._server.lock:
            return list(self._server.seen)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._server.shutdown()
        finally:
            self._server.server_close()
            self._thread.join(STOP_DEADLINE)


# ----- token auth (the real registry behind a Bearer token server) ------------------------
TOKEN_SERVICE = "layer-test"
TOKEN_ISSUER = "layer-test-issuer"


def b64url(data: bytes) -> str:
    """base64url without padding, as JWS wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """An RSA key and its self-signed certificate (made with the openssl CLI: the
    `cryptography` package is not needed) that sign RS256 tokens the registry accepts.

    Tokens carry the certificate in their `x5c` header; the registry verifies that chain
    against its `rootcertbundle` (this certificate), so a token from another TokenIssuer is
    refused.  distribution 2.8 would also accept a `kid` equal to the libtrust key ID of a
    bundled certificate's key, which needs more code to compute."""

    key: Path
    cert: Path
    cert_der: bytes
    name: str = TOKEN_ISSUER

    @classmethod
    def create(cls, workdir: Path, name: str = TOKEN_ISSUER) -> TokenIssuer:
        openssl = require_tool("openssl", "openssl")
        workdir.mkdir(parents=True, exist_ok=True)
        key, cert = workdir / "key.pem", workdir / "cert.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "3650", "-subj", f"/CN={name}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        der = subprocess.run(
            [openssl, "x509", "-in", str(cert), "-outform", "DER"],
            check=True, capture_output=True, timeout=30,
        ).stdout  # fmt: skip
        return cls(key, cert, der, name)

    def sign(self, claims: dict[str, object]) -> str:
        """A compact RS256 JWS of `claims`, with the certificate in `x5c`."""
        openssl = require_tool("openssl", "openssl")
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = subprocess.run(
            [openssl, "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True, timeout=30,
        ).stdout  # fmt: skip
        return f"{signing_input}.{b64url(signature)}"

    def token(
        self,
        subject: str,
        access: list[dict[str, object]],
        *,
        service: str = TOKEN_SERVICE,
        lifetime: int = 3600,
    ) -> str:
        """A registry token for `subject` granting `access` (a list of
        `{"type": "repository", "name": REPO, "actions": [...]}`)."""
        now = int(time.time())
        return self.sign(
            {
                "iss": self.name,
                "sub": subject,
                "aud": service,
                "exp": now + lifetime,
                "nbf": now - 10,
                "iat": now,
                "jti": secrets.token_hex(16),
                "access": access,
            }
        )


def token_auth_config(
    realm: str, issuer: TokenIssuer, service: str = TOKEN_SERVICE
) -> dict[str, object]:
    """The registry config's `auth` section for Bearer tokens from `realm`; use it with
    `running_registry(…, config_hook=lambda c: c.update(auth=token_auth_config(…)))`."""
    return {
        "token": {
            "realm": realm,
            "service": service,
            "issuer": issuer.name,
            "rootcertbundle": str(issuer.cert),
        }
    }

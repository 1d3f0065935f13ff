"""TLS verification of registry connections (imagestore.httpclient.verifying_context: the CA
certificates load at the first handshake, not when a client is made).  A local HTTPS server
with a self-signed certificate for 127.0.0.1: refused by default, trusted through
SSL_CERT_FILE, and reached without verification under tls_verify=False."""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagestore.errors import RegistryError
from imagestore.registry import RegistryClient
from tests.registry_util import require_tool

pytestmark = pytest.mark.unit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "openssl")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


@contextmanager
def https_server(cert: tuple[Path, Path]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def https_only(client: RegistryClient, monkeypatch) -> RegistryClient:
    monkeypatch.setattr(client, "schemes", lambda: ["https"])
    return client


def test_untrusted_certificate_is_refused(cert, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with https_server(cert) as host, RegistryClient(host, retries=0) as client:
        with pytest.raises(RegistryError, match="cannot reach registry"):
            https_only(client, monkeypatch).ping()


def test_certificate_trusted_through_ssl_cert_file(cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    with https_server(cert) as host, RegistryClient(host, retries=0) as client:
        assert https_only(client, monkeypatch).ping() == f"https://{host}"


def test_tls_verify_false_skips_verification(cert, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with https_server(cert) as host:
        with RegistryClient(host, tls_verify=False, retries=0) as client:
            assert https_only(client, monkeypatch).ping() == f"https://{host}"

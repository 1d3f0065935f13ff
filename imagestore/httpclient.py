"""httpx and httpcore, imported without the optional libraries they probe for.

httpcore imports trio and anyio at import time, when installed, for its async primitives, and
httpx imports pygments and rich for its command-line client.  The store uses only httpx's
synchronous client, yet this project installs trio (layerfs runs on it) and pygments (pytest
brings it), so every `layer pull` or `push` paid ~85 ms to import them.  Here they are hidden
while httpx is imported (a None entry in sys.modules makes `import` raise ImportError, which
both libraries expect when those are absent) and put back at once, so anything importing them
later gets them as usual; only httpcore's async primitives and the `httpx` command, which
nothing here uses, do without.
Every module of the store imports httpx and httpcore from here.

`verifying_context()` is what httpx's `verify=True` makes — a TLS client context trusting the
CA certificates of SSL_CERT_FILE, SSL_CERT_DIR or certifi — except that the certificates are
loaded at its first TLS handshake, not when the client is made: parsing certifi's bundle costs
~30 ms, which a pull from a plain-HTTP registry (localhost, the benchmark, CI) never needs.
Thread-safe (the first handshakes of several threads load the certificates once).
"""

from __future__ import annotations

import os
import ssl
import sys
import threading

_hidden = [name for name in ("trio", "anyio", "pygments") if name not in sys.modules]
for _name in _hidden:
    sys.modules[_name] = None  # type: ignore[assignment]
try:
    import httpcore
    import httpx
finally:
    for _name in _hidden:
        if sys.modules.get(_name, ...) is None:
            del sys.modules[_name]

__all__ = ["httpcore", "httpx", "verifying_context"]


class _DeferredTrust(ssl.SSLContext):
    """ssl.create_default_context(cafile=...) whose load_verify_locations waits for the
    first handshake (httpcore's sync backend calls wrap_socket for each connection)."""

    _lock = threading.Lock()
    _loaded = False

    def wrap_socket(self, *args: object, **kwargs: object) -> ssl.SSLSocket:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return super().wrap_socket(*args, **kwargs)  # type: ignore[arg-type]

    def _load(self) -> None:
        if os.environ.get("SSL_CERT_FILE"):  # httpx's own order (trust_env)
            self.load_verify_locations(cafile=os.environ["SSL_CERT_FILE"])
        elif os.environ.get("SSL_CERT_DIR"):
            self.load_verify_locations(capath=os.environ["SSL_CERT_DIR"])
        else:
            import certifi

            self.load_verify_locations(cafile=certifi.where())


def verifying_context() -> ssl.SSLContext:
    """For httpx.Client(verify=...): verifies like verify=True, loads its CAs when first used."""
    ctx = _DeferredTrust(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    keylog = os.environ.get("SSLKEYLOGFILE")  # as create_default_context does
    if keylog and not sys.flags.ignore_environment:
        ctx.keylog_filename = keylog
    return ctx

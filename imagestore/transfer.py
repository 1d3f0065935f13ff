"""Time and size bounds for registry transfers: a stall timeout, an overall deadline, and
bounded reads of bodies we only need a little of.

  - `Limits(stall, deadline)`: a transfer that receives fewer than `STALL_BYTES` bytes while
    waiting `stall` seconds for data is stalled (like curl's --speed-limit/--speed-time; a
    server that drips one byte a second is stalled, a silent one too), and nothing may go on
    past `deadline` seconds after the client was made.  `Limits.from_env()` reads
    `LAYER_STALL_TIMEOUT` and `LAYER_DEADLINE` (seconds; a deadline of 0 means none).
  - `install(client, meter)` puts a `Meter` under every connection pool of an httpx.Client, at
    the socket level: every read and write of every request (headers, bodies, the `/v2/` probe,
    the token server) is bounded, not only the loops that copy blobs.  The waiting counted for
    a stall restarts with each request sent, so think time between requests never adds up.
    A stall raises httpcore.ReadTimeout (httpx.ReadTimeout: transient, retried with resume);
    the deadline raises `DeadlineExceeded` (a RegistryError: never retried).
  - `read_limited(resp, limit)` reads at most `limit` bytes of a streamed response, then stops.

Threads: a Meter is shared by the client's connections; it keeps no per-request state but
its deadline, and each stream keeps its own stall count (one request at a time per stream).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .errors import RegistryError
from .httpclient import httpcore, httpx

STALL_BYTES = 1024
DEFAULT_STALL = 30.0


class DeadlineExceeded(RegistryError):
    """The transfer ran past the overall deadline."""


@dataclass(frozen=True)
class Limits:
    stall: float = DEFAULT_STALL
    deadline: float | None = None  # seconds from the client's creation; None: no deadline

    @classmethod
    def from_env(cls) -> Limits:
        stall = _seconds("LAYER_STALL_TIMEOUT", DEFAULT_STALL)
        deadline = _seconds("LAYER_DEADLINE", 0.0)
        return cls(stall or DEFAULT_STALL, deadline or None)


def _seconds(var: str, default: float) -> float:
    text = os.environ.get(var)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise RegistryError(f"{var} must be a number of seconds, not {text!r}") from None
    if not 0 <= value < 1e9:
        raise RegistryError(f"{var} must be a number of seconds, not {text!r}")
    return value


class Meter:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.ends = time.monotonic() + limits.deadline if limits.deadline else None

    def remaining(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def check(self) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"gave up after the {self.limits.deadline:g}s deadline")

    def bound(self, timeout: float | None, waited: float) -> float:
        """The timeout for one socket call: never past a stall, never past the deadline."""
        self.check()
        bound = self.limits.stall - waited
        left = self.remaining()
        if left is not None:
            bound = min(bound, left)
        return max(0.001, bound if timeout is None else min(timeout, bound))


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter
        self.waited = 0.0  # seconds spent waiting in reads since the last progress
        self.got = 0  # bytes received since the last progress

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        start = time.monotonic()
        try:
            data = self.inner.read(max_bytes, self.meter.bound(timeout, self.waited))
        except httpcore.ReadTimeout:
            self.meter.check()
            raise httpcore.ReadTimeout(
                f"no data for {self.meter.limits.stall:g}s (stalled)"
            ) from None
        self.waited += time.monotonic() - start
        self.got += len(data)
        if self.got >= STALL_BYTES or not data:
            self.waited, self.got = 0.0, 0
        elif self.waited >= self.meter.limits.stall:
            self.meter.check()
            raise httpcore.ReadTimeout(
                f"stalled: {self.got} bytes in {self.waited:.0f}s "
                f"(fewer than {STALL_BYTES} in {self.meter.limits.stall:g}s)"
            )
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.waited, self.got = 0.0, 0  # a new request (or more of one): count afresh
        self.inner.write(buffer, self.meter.bound(timeout, 0.0))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self.inner.start_tls(ssl_context, server_hostname, self.meter.bound(timeout, 0.0))
        return _Stream(inner, self.meter)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self.inner.connect_tcp(
            host, port, self.meter.bound(timeout, 0.0), local_address, socket_options
        )
        return _Stream(stream, self.meter)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        stream = self.inner.connect_unix_socket(
            path, self.meter.bound(timeout, 0.0), socket_options
        )
        return _Stream(stream, self.meter)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def install(client: httpx.Client, meter: Meter) -> None:
    """Meter every connection `client` makes (its default transport and its proxy mounts).
    httpx has no public hook below the transport, so this reaches the pools' backend."""
    transports = [client._transport, *client._mounts.values()]  # noqa: SLF001
    for transport in transports:
        if transport is None:  # a NO_PROXY entry: no transport of its own
            continue
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            raise RuntimeError("httpx changed: cannot bound its transfers")
        pool._network_backend = _Backend(backend, meter)  # type: ignore[union-attr]


def read_limited(resp: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of a streamed response's body (decoded); the rest is not read."""
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])

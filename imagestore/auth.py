"""Registry authentication: challenges, credentials and Bearer tokens.

  - `parse_www_authenticate` reads RFC 7235 challenges (`Bearer realm="…",service="…"`,
    `Basic realm="…"`), several per header or several headers.
  - `lookup_credentials(host, repo)` finds a user name and password, in this order:
      1. `LAYER_CREDS=user:password` in the environment — used for every registry this
         process talks to, like skopeo's `--creds`;
      2. the auth files containers/image and docker read, first match wins:
         `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
         `~/.config/containers/auth.json`, `~/.docker/config.json`.  Their `auths` map is
         keyed by host (`127.0.0.1:5000`), by host and namespace (`quay.io/team`, the most
         specific wins), or by URL (`https://index.docker.io/v1/`); the `auth` field is
         base64 `user:password`.  Docker Hub's names (`docker.io`, `index.docker.io`,
         `registry-1.docker.io`) are one host.  Credential helpers (`credHelpers`,
         `credsStore`) and identity tokens are not supported (see the GAP below).
    Explicit credentials given to RegistryClient come before both.
  - `fetch_token` runs the token flow of the distribution spec (docs/spec/auth/token.md):
    GET realm?service=…&scope=…, with Basic credentials when we have them (anonymous
    otherwise); the answer's `token` (or `access_token`) is valid for `expires_in` seconds
    (60 when absent).  `TokenCache` keeps one token per scope.

Threads: `TokenCache` is safe to share (one lock); everything else is pure or read-only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthError, RegistryError
from .httpclient import httpx
from .transfer import read_limited

Credentials = tuple[str, str]
TOKEN_DEFAULT_LIFETIME = 60.0
TOKEN_SLACK = 10.0  # refresh a token this long before it expires
MAX_TOKEN_BODY = 1 << 20
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic", …
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_www_authenticate(headers: list[str]) -> list[Challenge]:
    """All challenges in the given WWW-Authenticate header values, in order."""
    out: list[Challenge] = []
    for value in headers:
        pos = 0
        while pos < len(value):
            if value[pos] in ", \t":
                pos += 1
                continue
            m = _SCHEME_RE.match(value, pos)
            if not m:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while True:
                p = _PARAM_RE.match(value, pos)
                if not p:
                    break
                quoted, bare = p.group(2), p.group(3)
                raw = quoted if quoted is not None else bare
                params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
                pos = p.end()
            out.append(Challenge(scheme, params))
    return out


# ----- credentials ------------------------------------------------------------------------
def auth_file_paths() -> list[Path]:
    paths: list[Path] = []
    env_file = os.environ.get("REGISTRY_AUTH_FILE")
    if env_file:
        paths.append(Path(env_file))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        paths.append(Path(runtime) / "containers" / "auth.json")
    home = Path(os.path.expanduser("~"))
    paths.append(home / ".config" / "containers" / "auth.json")
    paths.append(home / ".docker" / "config.json")
    return paths


def _canon_host(host: str) -> str:
    host = host.lower()
    return "docker.io" if host in _DOCKER_HUB else host


def _normalize_key(key: str) -> str:
    """An `auths` key as `host[/namespace…]`; a URL key keeps only its host."""
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, _, path = key.rstrip("/").partition("/")
    return _canon_host(host) + (f"/{path}" if path else "")


# GAP(issue-14): credential helpers (`credHelpers`, `credsStore`) and identity tokens in the
# auth files are ignored: such an entry gives no credentials, so the pull goes anonymous.
def _decode_auth(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=False).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None


def _read_auths(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read registry auth file {path}: {exc}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    return auths if isinstance(auths, dict) else {}


def lookup_credentials(host: str, repo: str | None = None) -> tuple[Credentials, str] | None:
    """(credentials, where they came from) for `host` (and `repo`), or None."""
    env = os.environ.get("LAYER_CREDS")
    if env:
        user, sep, password = env.partition(":")
        if not sep or not user:
            raise AuthError("LAYER_CREDS must be USER:PASSWORD")
        return (user, password), "LAYER_CREDS"
    h = _canon_host(host)
    wanted = []
    if repo:
        parts = repo.split("/")
        wanted = [f"{h}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    wanted.append(h)
    for path in auth_file_paths():
        auths = {_normalize_key(k): v for k, v in _read_auths(path).items()}
        for key in wanted:
            creds = _decode_auth(auths.get(key))
            if creds is not None:
                return creds, str(path)
    return None


# ----- bearer tokens ----------------------------------------------------------------------
@dataclass(frozen=True)
class BearerToken:
    token: str
    expires_at: float  # time.monotonic() after which we fetch a new one

    @classmethod
    def valid_for(cls, token: str, lifetime: float) -> BearerToken:
        """A token that counts as stale a little before the server's deadline."""
        return cls(token, time.monotonic() + lifetime - min(TOKEN_SLACK, lifetime / 2))

    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


class TokenCache:
    """One Bearer token per scope string; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, BearerToken] = {}

    def get(self, scope: str) -> BearerToken | None:
        with self._lock:
            tok = self._tokens.get(scope)
            return tok if tok is not None and tok.fresh() else None

    def put(self, scope: str, token: BearerToken) -> None:
        with self._lock:
            self._tokens[scope] = token

    def drop(self, scope: str) -> None:
        with self._lock:
            self._tokens.pop(scope, None)


def fetch_token(
    client: httpx.Client, challenge: Challenge, scope: str, creds: Credentials | None
) -> BearerToken:
    """Ask the challenge's realm for a token for `scope`.  AuthError when refused."""
    realm = challenge.realm
    if not realm:
        raise RegistryError("the registry's Bearer challenge has no realm")
    params = {}
    if challenge.params.get("service"):
        params["service"] = challenge.params["service"]
    if scope:
        params["scope"] = scope
    if creds is not None:
        params["account"] = creds[0]
    auth = httpx.BasicAuth(*creds) if creds is not None else None
    try:
        url = httpx.URL(realm)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("not an http(s) URL")
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise RegistryError(f"the registry's Bearer realm {realm!r} is not a URL: {exc}") from None
    try:
        with client.stream("GET", url, params=params, auth=auth, follow_redirects=True) as resp:
            status = resp.status_code
            body = read_limited(resp, MAX_TOKEN_BODY + 1) if status == 200 else b""
    except httpx.TransportError as exc:
        raise RegistryError(f"cannot reach the token server {realm}: {exc}") from exc
    except httpx.TooManyRedirects:
        raise RegistryError(f"the token server {realm} redirects too often") from None
    if status in (401, 403):
        who = f"user {creds[0]!r}" if creds else "anonymous access"
        raise AuthError(f"the token server {realm} refused {who} for {scope or 'the registry'}")
    if status != 200:
        raise RegistryError(f"the token server {realm} answered HTTP {status}")
    if len(body) > MAX_TOKEN_BODY:
        raise RegistryError(f"the token server {realm} sent an oversized answer")
    try:
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
        lifetime = float(data.get("expires_in") or TOKEN_DEFAULT_LIFETIME)
        if not 0 < lifetime < 1e9:
            raise ValueError("expires_in out of range")
    except (ValueError, AttributeError, TypeError, OverflowError):
        raise RegistryError(f"the token server {realm} sent an unreadable answer") from None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"the token server {realm} sent no token")
    return BearerToken.valid_for(token, max(lifetime, 1.0))

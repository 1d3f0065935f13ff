"""RegistryClient: read images from a registry over the OCI distribution API (v2).

What it does, and what it promises:
  - `get_manifest(repo, ref)` negotiates OCI index/manifest and Docker list/schema 2 and
    returns the bytes, their media type and their digest, verified against the
    `Docker-Content-Digest` header and, when `ref` is a digest, against `ref`.
  - `fetch_blob(repo, digest, size, store)` streams a blob into `store.ingest(key="dl-<hex>")`,
    verifying digest and size in `commit()`: a blob becomes visible only when it is right.
    The ingest is locked: a second process pulling the same blob waits for the first, then
    finds the blob in the store (or resumes the partial file the first one left).
    Transient failures (connection dropped, timeouts, HTTP 429/5xx) are retried with
    exponential backoff, resuming with `Range: bytes=N-`; a server that answers 200 instead of
    206 makes us start the ingest over.  A partial file survives a failed call, and the next
    call resumes it (if what was resumed does not verify, the blob is fetched once more from
    scratch).  Idempotent: a blob already in the store returns at once.
  - Redirects (blob storage on S3, a CDN…) are followed by hand, and the Authorization header
    is sent only to the registry's own origin (scheme, host and port).

Push primitives (the upload sequence itself lives in imagestore.upload):
  - `send(method, repo, target, …)` is one authenticated request for `repository:<repo>:
    pull,push` (or a given scope) to a path under `/v2/<repo>/` or to a Location the
    registry handed out; a 401 renews challenge and token and sends once more.
  - `expect(resp, what, *codes)` raises the domain error for any other status, and
    `retrying(fn, what)` retries transient failures (both as for pulls).

Transport, as docker and skopeo do it:
  - normally https only, with certificate verification;
  - a loopback registry (localhost, 127.0.0.0/8, ::1) is tried over plain http first, then
    https (a test or development registry on this machine; nothing crosses a network);
  - `tls_verify=False` is skopeo's `--tls-verify=false`: https without certificate
    verification first and, when that fails, plain http (containers/image
    `detectPropertiesHelper`).
  The first scheme whose `/v2/` answers 200 or 401 is kept for the client's lifetime.

Authentication: the `/v2/` probe (or any later 401) gives the challenge.  Basic: the
credentials go with every request to the registry.  Bearer: a token for
`repository:<repo>:pull` from the realm, anonymous or with Basic credentials, cached per scope
until shortly before it expires; a 401 drops it and fetches a new one, once.  Credentials:
the explicit `creds`, else `LAYER_CREDS=user:password`, else the auth files (see
imagestore.auth).  Errors: 404 → ImageNotFound (manifests) / BlobNotFound (blobs); 401/403
after authenticating → AuthError; other failures, unreachable hosts included → RegistryError,
always naming the host.

Threads: one client may serve many threads at once (httpx.Client pools connections under its
own locks; the token cache has a lock; probing the registry happens once under a lock).
Concurrent `fetch_blob` calls for the same digest are serialised by a per-digest lock; other
processes are kept out by the store lock that `layer pull` holds.
Size: over 500 lines because transport, redirects, retries and auth of the one client belong
together (upload.py and auth.py already hold the push sequence and the token flow).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

from . import __version__, auth
from .auth import Challenge, Credentials, TokenCache
from .digest import Digest
from .errors import (
    AuthError,
    BadReference,
    BlobNotFound,
    DigestMismatch,
    ImageNotFound,
    RegistryError,
)
from .httpclient import httpx, verifying_context
from .media import ACCEPT, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from .progress import Progress
from .reference import TAG_RE, canonical_host, check_repository, is_loopback
from .store import Ingest, Store
from .transfer import Limits, Meter, install, read_limited

KNOWN_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MAX_MANIFEST = 4 << 20  # containers/image's limit
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = f"layer/{__version__} (+python-httpx)"

Body = bytes | Callable[[], Iterable[bytes]]  # a callable gives the body afresh for a resend
T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying (dropped connection, 429, 5xx, short read)."""


class RegistryClient:
    def __init__(
        self,
        host: str,
        *,
        tls_verify: bool = True,
        creds: Credentials | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        limits: Limits | None = None,
    ) -> None:
        self.host = canonical_host(host)
        self.tls_verify = tls_verify
        self.retries = retries
        self.backoff = backoff
        self._explicit_creds = creds
        self._client = httpx.Client(
            verify=verifying_context() if tls_verify else False,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self.limits = limits or Limits.from_env()
        self._meter = Meter(self.limits)
        install(self._client, self._meter)
        self._lock = threading.Lock()  # the probe, the challenge, the credentials
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._creds: tuple[Credentials, str] | None = None
        self._creds_looked_up = False
        self._tokens = TokenCache()
        self._blob_locks: dict[str, threading.Lock] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # ----- public API ----------------------------------------------------------------------
    def ping(self) -> str:
        """Probe `/v2/` (once) and return the base URL in use, e.g. `http://127.0.0.1:5000`."""
        if self._base is not None:
            return self._base
        with self._lock:
            if self._base is not None:
                return self._base
            failures = []
            for scheme in self.schemes():
                url = f"{scheme}://{self.host}/v2/"
                try:
                    with self._client.stream("GET", url) as resp:
                        pass  # status and headers only: the body is never read
                except httpx.TransportError as exc:
                    failures.append(f"{url}: {_describe(exc)}")
                    continue
                if resp.status_code in (200, 401):
                    challenges = auth.parse_www_authenticate(
                        resp.headers.get_list("www-authenticate")
                    )
                    self._challenge = _pick_challenge(challenges)
                    self._base = f"{scheme}://{self.host}"
                    return self._base
                failures.append(f"{url}: HTTP {resp.status_code}")
            raise RegistryError(f"cannot reach registry {self.host}: " + "; ".join(failures))

    def schemes(self) -> list[str]:
        """The URL schemes to probe, in order (see the module docstring)."""
        if is_loopback(self.host):
            return ["http", "https"]
        if not self.tls_verify:
            return ["https", "http"]
        return ["https"]

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, Digest]:
        """(bytes, media type, digest) of the manifest or index `repo:ref` (tag or digest)."""
        check_repository(repo)
        want = Digest.parse(ref) if ":" in ref else None
        if want is None and not TAG_RE.fullmatch(ref):
            raise RegistryError(f"invalid tag {ref!r}")
        what = f"{self.host}/{repo}{'@' if want else ':'}{ref}"
        body, headers = self._retrying(lambda: self._get_manifest_once(repo, ref, what), what)
        media_type = headers.get("content-type", "").split(";")[0].strip()
        sniffed, schema_version = _sniff(body)
        if media_type not in KNOWN_MANIFEST_TYPES + SCHEMA1_TYPES:
            media_type = sniffed or media_type  # a generic application/json, or none
        if media_type in SCHEMA1_TYPES or schema_version == 1:
            raise RegistryError(f"{what} is a Docker schema 1 manifest, which is not supported")
        if want is not None:
            _verify(body, want, what)
        header = headers.get("docker-content-digest")
        if header:
            try:
                announced = Digest.parse(header.strip())
            except BadReference:
                raise DigestMismatch(f"{what}: bad Docker-Content-Digest {header!r}") from None
            _verify(body, announced, what)
        return body, media_type, want or Digest.of(body)

    def fetch_blob(
        self,
        repo: str,
        digest: Digest,
        size: int | None,
        store: Store,
        progress: Progress | None = None,
    ) -> Digest:
        """Download blob `digest` into `store` (verified), resuming partial downloads."""
        check_repository(repo)
        if store.has_blob(digest):
            return digest
        with self._blob_lock(digest):
            if store.has_blob(digest):
                return digest
            for attempt in range(2):
                ing = store.ingest(digest, size, key=f"dl-{digest.hex}")  # waits for its writer
                if ing.present:  # another process downloaded it while we waited
                    return ing.commit()
                resumed = ing.offset > 0
                try:
                    return self._download(repo, digest, size, ing, progress)
                except DigestMismatch:
                    ing.abort()
                    if not resumed or attempt:
                        raise
                    # the partial file an earlier run left did not verify: start afresh
                except BaseException:
                    ing.close()  # keep the partial file: the next call resumes it
                    raise
        raise AssertionError("unreachable")

    # ----- push primitives (see imagestore.upload) -----------------------------------------
    def send(
        self,
        method: str,
        repo: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        scope: str | None = None,
    ) -> httpx.Response:
        """One request for the push side, its answer read whole (push answers are small).

        `target` is a path under `/v2/<repo>/` (`blobs/uploads/`) or a Location the registry
        gave (absolute, or relative to its origin).  Authorization goes to our own origin only.
        Transport failures raise `_Transient`, for `retrying`."""
        check_repository(repo)
        base = self.ping()
        scope = scope or push_scope(repo)
        if target.startswith("/") or "://" in target:
            url = httpx.URL(base).join(target)
        else:
            url = httpx.URL(f"{base}/v2/{repo}/{target}")
        for attempt in range(2):
            h = dict(headers or {})
            authz = self._authorization(scope, repo)
            if authz is not None and _same_origin(url, httpx.URL(base)):
                h["Authorization"] = authz
            content = body() if callable(body) else body
            req = self._client.build_request(method, url, headers=h, content=content)
            try:
                streamed = self._client.send(req, stream=True)
                try:
                    answer = read_limited(streamed, MAX_ERROR_BODY)
                finally:
                    streamed.close()
            except httpx.TransportError as exc:
                raise _Transient(f"{url.host}: {_describe(exc)}") from exc
            resp = httpx.Response(
                streamed.status_code, headers=streamed.headers, content=answer, request=req
            )
            if resp.status_code != 401 or attempt:
                return resp
            challenges = auth.parse_www_authenticate(resp.headers.get_list("www-authenticate"))
            with self._lock:
                self._challenge = _pick_challenge(challenges) or self._challenge
                if self._challenge is None:
                    self._raise_auth(resp, f"{self.host}/{repo}", resp.content)
            self._tokens.drop(scope)
        raise AssertionError("unreachable")

    def expect(self, resp: httpx.Response, what: str, *codes: int) -> None:
        """Return if `resp` has one of `codes`; else raise AuthError (401/403), RegistryError,
        or `_Transient` (429, 5xx) for `retrying`."""
        if resp.status_code in codes:
            return
        self._check(resp, what, RegistryError)
        raise RegistryError(f"{what}: registry answered HTTP {resp.status_code}")

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """Call `fn`, retrying transient failures with exponential backoff."""
        return self._retrying(fn, what)

    # ----- blobs ---------------------------------------------------------------------------
    @contextmanager
    def _blob_lock(self, digest: Digest) -> Iterator[None]:
        with self._lock:
            lock = self._blob_locks.setdefault(str(digest), threading.Lock())
        with lock:
            yield

    def _download(
        self, repo: str, digest: Digest, size: int | None, ing: Ingest, progress: Progress | None
    ) -> Digest:
        what = f"blob {digest} from {self.host}/{repo}"
        if size is not None and ing.offset > size:
            ing.restart()

        def once() -> None:
            if size is not None and ing.offset == size:  # an earlier run got every byte
                if progress is not None:
                    progress(ing.offset, size)
                return
            self._download_once(repo, digest, size, ing, progress, what)

        self._retrying(once, what)
        return ing.commit()

    def _download_once(
        self,
        repo: str,
        digest: Digest,
        size: int | None,
        ing: Ingest,
        progress: Progress | None,
        what: str,
    ) -> None:
        start = ing.offset
        headers = {"Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        with self._open(repo, f"blobs/{digest}", headers) as resp:
            if resp.status_code == 416 and start:
                ing.restart()
                raise _Transient("the server refused to resume (416); starting over")
            self._check(resp, what, BlobNotFound)
            if resp.status_code == 206:
                if _content_range_start(resp) != start:
                    ing.restart()
                    raise _Transient("the server resumed at the wrong offset; starting over")
            elif start:
                ing.restart()  # 200: the server ignored our Range request
            if progress is not None:
                progress(ing.offset, size)
            for chunk in resp.iter_raw():
                ing.write(chunk)
                if progress is not None:
                    progress(ing.offset, size)
        if size is not None and ing.offset < size:
            raise _Transient(f"connection closed after {ing.offset} of {size} bytes")

    # ----- manifests -----------------------------------------------------------------------
    def _get_manifest_once(self, repo: str, ref: str, what: str) -> tuple[bytes, httpx.Headers]:
        with self._open(repo, f"manifests/{ref}", {"Accept": ACCEPT}) as resp:
            self._check(resp, f"manifest {what}", ImageNotFound)
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise RegistryError(f"manifest {what} is larger than {MAX_MANIFEST} bytes")
            return bytes(body), resp.headers

    # ----- requests, auth, redirects, retries ---------------------------------------------
    @contextmanager
    def _open(self, repo: str, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """GET /v2/<repo>/<path> with authentication; the response is streamed."""
        base = self.ping()
        scope = f"repository:{repo}:pull"
        url = f"{base}/v2/{repo}/{path}"
        resp = self._follow(url, headers, self._authorization(scope, repo))
        if resp.status_code == 401 and _same_origin(resp.url, httpx.URL(base)):
            body = read_limited(resp, MAX_ERROR_BODY)
            challenges = auth.parse_www_authenticate(resp.headers.get_list("www-authenticate"))
            resp.close()
            with self._lock:
                self._challenge = _pick_challenge(challenges) or self._challenge
                if self._challenge is None:
                    self._raise_auth(resp, f"{self.host}/{repo}", body)
            self._tokens.drop(scope)
            resp = self._follow(url, headers, self._authorization(scope, repo))
        try:
            yield resp
        finally:
            resp.close()

    def _follow(self, url: str, headers: dict[str, str], authz: str | None) -> httpx.Response:
        """Send a GET, following redirects by hand; Authorization only to our own origin."""
        origin = httpx.URL(self._base or url)
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            target = httpx.URL(url)
            if authz is not None and _same_origin(target, origin):
                h["Authorization"] = authz
            req = self._client.build_request("GET", target, headers=h)
            try:
                resp = self._client.send(req, stream=True)
            except httpx.TransportError as exc:
                raise _Transient(f"{target.host}: {_describe(exc)}") from exc
            location = resp.headers.get("location")
            if resp.status_code not in REDIRECTS or not location:
                return resp
            resp.close()
            url = str(target.join(location))
        raise RegistryError(f"too many redirects from {self.host} (last: {url})")

    def _authorization(self, scope: str, repo: str) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        creds = self._credentials(repo)
        if challenge.scheme == "basic":
            if creds is None:
                return None
            return basic_header(creds[0])
        if challenge.scheme == "bearer":
            token = self._tokens.get(scope)
            if token is None:
                token = auth.fetch_token(
                    self._client, challenge, scope, creds[0] if creds else None
                )
                self._tokens.put(scope, token)
            return f"Bearer {token.token}"
        return None

    def _credentials(self, repo: str) -> tuple[Credentials, str] | None:
        with self._lock:
            if not self._creds_looked_up:
                if self._explicit_creds is not None:
                    self._creds = (self._explicit_creds, "the given credentials")
                else:
                    self._creds = auth.lookup_credentials(self.host, repo)
                self._creds_looked_up = True
            return self._creds

    def _check(self, resp: httpx.Response, what: str, not_found: type[Exception]) -> None:
        """Raise the domain error for a failed response (or _Transient to retry it)."""
        code = resp.status_code
        if code in (200, 206):
            return
        body = read_limited(resp, MAX_ERROR_BODY)
        detail = _error_detail(body)
        if code == 404:
            raise not_found(f"{what} not found{detail}")
        elsewhere = self._base is not None and not _same_origin(resp.url, httpx.URL(self._base))
        if code in (401, 403) and elsewhere:
            # a redirect target (blob storage, a CDN) got no credentials from us: it is its
            # own refusal (an expired signed URL, a private bucket), not our credentials'
            raise RegistryError(
                f"{what}: {resp.url.scheme}://{resp.url.netloc.decode()}, where "
                f"{self.host} redirected us, answered HTTP {code}{detail}"
            )
        if code in (401, 403):
            self._raise_auth(resp, what, body)
        if code == 429 or code >= 500:
            raise _Transient(f"HTTP {code}{detail}")
        raise RegistryError(f"{what}: registry answered HTTP {code}{detail}")

    def _raise_auth(self, resp: httpx.Response, what: str, body: bytes = b"") -> NoReturn:
        creds = self._creds if self._creds_looked_up else None
        detail = _error_detail(body)
        if resp.status_code == 403:
            raise AuthError(f"{self.host} denied access to {what}{detail}")
        if creds is not None:
            raise AuthError(
                f"{self.host} refused the credentials of user {creds[0][0]!r} "
                f"(from {creds[1]}) for {what}{detail}"
            )
        raise AuthError(
            f"{self.host} requires authentication for {what} and no credentials were found "
            "(use --creds, LAYER_CREDS=user:password, or `skopeo login`/`docker login`); "
            f"or the repository does not exist{detail}"
        )

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        """Call `fn`, retrying transient failures with exponential backoff."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (_Transient, httpx.TransportError) as exc:
                left = self._meter.remaining()
                if attempt == self.retries or (left is not None and left <= delay):
                    raise RegistryError(
                        f"{what}: {_describe(exc)} (gave up after {attempt + 1} attempts)"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")


# ----- helpers ----------------------------------------------------------------------------
def push_scope(repo: str) -> str:
    """The token scope a push to `repo` needs (HEAD and mounts read, uploads write)."""
    return f"repository:{repo}:pull,push"


def _pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer over Basic (as docker does); unknown schemes are ignored."""
    for scheme in ("bearer", "basic"):
        for ch in challenges:
            if ch.scheme == scheme:
                return ch
    return None


def basic_header(creds: Credentials) -> str:
    user, password = creds
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    return text


def _content_range_start(resp: httpx.Response) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", resp.headers.get("content-range", ""))
    return int(m.group(1)) if m else None


def _error_detail(body: bytes) -> str:
    """': CODE: message' from a distribution error body, or a snippet of the text."""
    body = body[:MAX_ERROR_BODY]
    try:
        errors = json.loads(body).get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
        text = "; ".join(p for p in parts if p)
    except (ValueError, AttributeError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:200]
    return f" ({text})" if text else ""


def _verify(body: bytes, digest: Digest, what: str) -> None:
    h = digest.hasher()
    h.update(body)
    got = Digest.from_hash(h)
    if got != digest:
        raise DigestMismatch(f"{what}: the manifest's bytes hash to {got}, expected {digest}")


def _sniff(body: bytes) -> tuple[str | None, int | None]:
    """(media type, schemaVersion) read from a manifest's JSON, for servers that send a
    generic Content-Type: the `mediaType` field, else OCI index or manifest by shape."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    version = obj.get("schemaVersion")
    version = version if isinstance(version, int) else None
    media_type = obj.get("mediaType")
    if isinstance(media_type, str):
        return media_type, version
    if isinstance(obj.get("manifests"), list):
        return OCI_INDEX, version
    if isinstance(obj.get("config"), dict):
        return OCI_MANIFEST, version
    return None, version

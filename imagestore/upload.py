"""Upload blobs and manifests to a registry (OCI distribution spec, "push"), over RegistryClient.

  - `blob_exists` is `HEAD /v2/<repo>/blobs/<digest>`.
  - `push_blob` skips a blob the registry has; else, with `from_repo` (the repository the image
    came from, on the same registry), tries a cross-repository mount `POST blobs/uploads/
    ?mount=<digest>&from=<repo>` (201: done; 202: the registry opened an upload session
    instead, which we use; 401/403: not allowed, a plain upload follows); else `POST
    blobs/uploads/`.  A blob of at most `threshold` bytes goes in one `PUT <location>?digest=`;
    a larger one in `PATCH` chunks of `chunk_size` (Content-Range, following the Location each
    answer returns), then an empty `PUT ?digest=`.  The registry verifies the digest; a
    `Docker-Content-Digest` answer that disagrees is a DigestMismatch.  A transient failure
    restarts the blob's upload from a new session.  Idempotent.
  - `put_manifest` PUTs the exact bytes with their exact media type as Content-Type and checks
    the `Docker-Content-Digest` answer against the bytes' digest.
Blob bodies are read from `opener()` (a fresh file each attempt), never held whole in memory
(chunks are).  Threads: the functions share nothing but the client, which is thread-safe, so
several blobs may be pushed at once; the caller pushes the manifest after all its blobs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from .digest import Digest
from .errors import BadReference, DigestMismatch, RegistryError
from .httpclient import httpx
from .progress import Progress
from .registry import RegistryClient, push_scope

DEFAULT_THRESHOLD = 16 << 20  # larger blobs are uploaded in chunks
DEFAULT_CHUNK_SIZE = 8 << 20
READ_SIZE = 1 << 20
OCTET = "application/octet-stream"

Opener = Callable[[], BinaryIO]


def blob_exists(client: RegistryClient, repo: str, digest: Digest) -> bool:
    resp = client.send("HEAD", repo, f"blobs/{digest}")
    if resp.status_code == 404:
        return False
    client.expect(resp, f"blob {digest} in {client.host}/{repo}", 200, 307)
    return True


def push_blob(
    client: RegistryClient,
    repo: str,
    digest: Digest,
    size: int,
    opener: Opener,
    *,
    from_repo: str | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> str:
    """Make blob `digest` exist in `repo`; returns "exists", "mounted" or "uploaded"."""
    what = f"blob {digest} to {client.host}/{repo}"
    if client.retrying(lambda: blob_exists(client, repo, digest), what):
        return "exists"

    def once() -> str:
        location = _start(client, repo, digest, from_repo, what)
        if location is None:
            return "mounted"
        if size <= threshold:
            _put_whole(client, repo, location, digest, size, opener, progress, what)
        else:
            _put_chunks(client, repo, location, digest, size, opener, chunk_size, progress, what)
        return "uploaded"

    return client.retrying(once, what)


def put_manifest(
    client: RegistryClient, repo: str, ref: str, data: bytes, media_type: str
) -> Digest:
    """PUT the manifest `data` as `repo:ref`; returns its digest, as the registry confirmed it."""
    what = f"manifest {client.host}/{repo}:{ref}"
    expected = Digest.of(data)

    def once() -> httpx.Response:
        resp = client.send(
            "PUT", repo, f"manifests/{ref}", headers={"Content-Type": media_type}, body=data
        )
        client.expect(resp, what, 201, 200)
        return resp

    _check_digest(client.retrying(once, what), expected, what)
    return expected


# ----- the steps of one blob upload ------------------------------------------------------
def _start(
    client: RegistryClient, repo: str, digest: Digest, from_repo: str | None, what: str
) -> str | None:
    """The Location of a new upload session, or None when a mount made the blob exist."""
    if from_repo and from_repo != repo:
        resp = client.send(
            "POST",
            repo,
            f"blobs/uploads/?mount={digest}&from={from_repo}",
            body=b"",
            scope=f"{push_scope(repo)} repository:{from_repo}:pull",
        )
        if resp.status_code == 201:
            _check_digest(resp, digest, what)
            return None
        if resp.status_code == 202:
            return _location(resp, what)
        if resp.status_code not in (401, 403, 404):
            client.expect(resp, f"mount of {what} from {from_repo}", 201, 202)
    resp = client.send("POST", repo, "blobs/uploads/", body=b"")
    client.expect(resp, f"start of upload of {what}", 202)
    return _location(resp, what)


def _put_whole(
    client: RegistryClient,
    repo: str,
    location: str,
    digest: Digest,
    size: int,
    opener: Opener,
    progress: Progress | None,
    what: str,
) -> None:
    def body() -> Iterator[bytes]:
        done = 0
        with opener() as f:
            while chunk := f.read(READ_SIZE):
                done += len(chunk)
                if progress is not None:
                    progress(done, size)
                yield chunk

    headers = {"Content-Type": OCTET, "Content-Length": str(size)}
    resp = client.send("PUT", repo, _with_digest(location, digest), headers=headers, body=body)
    client.expect(resp, f"upload of {what}", 201)
    _check_digest(resp, digest, what)


def _put_chunks(
    client: RegistryClient,
    repo: str,
    location: str,
    digest: Digest,
    size: int,
    opener: Opener,
    chunk_size: int,
    progress: Progress | None,
    what: str,
) -> None:
    offset = 0
    with opener() as f:
        while chunk := f.read(chunk_size):
            end = offset + len(chunk) - 1
            headers = {
                "Content-Type": OCTET,
                "Content-Range": f"{offset}-{end}",
                "Content-Length": str(len(chunk)),
            }
            resp = client.send("PATCH", repo, location, headers=headers, body=chunk)
            client.expect(resp, f"chunk {offset}-{end} of {what}", 202)
            got = resp.headers.get("range", "")
            if got and got.replace("bytes=", "") != f"0-{end}":
                raise RegistryError(f"{what}: the registry holds {got!r} after bytes 0-{end}")
            location = _location(resp, what)
            offset = end + 1
            if progress is not None:
                progress(offset, size)
    if offset != size:
        raise DigestMismatch(f"{what}: read {offset} bytes, expected {size}")
    resp = client.send("PUT", repo, _with_digest(location, digest), body=b"")
    client.expect(resp, f"end of upload of {what}", 201)
    _check_digest(resp, digest, what)


# ----- helpers ----------------------------------------------------------------------------
def _location(resp: httpx.Response, what: str) -> str:
    location = resp.headers.get("location")
    if not location:
        raise RegistryError(f"{what}: the registry gave no Location for the upload")
    return location


def _with_digest(location: str, digest: Digest) -> str:
    return str(httpx.URL(location).copy_add_param("digest", str(digest)))


def _check_digest(resp: httpx.Response, expected: Digest, what: str) -> None:
    header = resp.headers.get("docker-content-digest")
    if not header:
        return
    try:
        got = Digest.parse(header.strip())
    except BadReference:
        raise DigestMismatch(f"{what}: bad Docker-Content-Digest {header!r}") from None
    if got != expected:
        raise DigestMismatch(f"{what}: the registry stored {got}, expected {expected}")

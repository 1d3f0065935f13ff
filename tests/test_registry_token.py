"""RegistryClient against the real docker-registry configured for token auth: the registry
sends real Bearer challenges and verifies real RS256 tokens (signed with the openssl CLI)
that a small token server issues.

The token server's policy (Docker Hub's, in small):
  - Basic `tester:s3cret`: a token granting every action the scope asks for;
  - Basic `forger:…`: a token granting everything, but signed by a key the registry does not
    trust (same issuer name, other certificate) — the registry must refuse it;
  - any other Basic credentials: HTTP 401, no token;
  - anonymous: a token granting `pull` on the public repositories (`test/img`) and nothing on
    the others (`test/private`), so the registry answers 401 `insufficient_scope`.
skopeo pushes the images through the same token flow, which checks the token server too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imagestore.digest import Digest
from imagestore.errors import AuthError
from imagestore.media import OCI_MANIFEST
from imagestore.registry import RegistryClient
from imagestore.store import Store
from tests.registry_util import (
    TOKEN_SERVICE,
    FakeServer,
    Handler,
    Registry,
    Seen,
    TokenIssuer,
    make_image,
    require_tool,
    running_registry,
    skopeo_copy,
    token_auth_config,
    write_oci_layout,
)

USER, PASSWORD = "tester", "s3cret"
FORGER = "forger"
PUBLIC = frozenset({"test/img"})
IMG = make_image({"hello.txt": b"hello through a Bearer token\n", "big": bytes(range(256)) * 64})


pytestmark = pytest.mark.usefixtures("no_real_credentials")


# ----- the token server -------------------------------------------------------------------
@dataclass
class Issued:
    """One token the server handed out (or refused: `user` set, `granted` None)."""

    user: str | None  # None: anonymous
    service: str
    scopes: list[str]
    granted: list[dict[str, object]] | None


@dataclass
class TokenPolicy:
    issuer: TokenIssuer
    forger: TokenIssuer
    issued: list[Issued] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, h: Handler) -> None:
        url = urlsplit(h.path)
        if url.path != "/token":
            h.reply(404)
            return
        query = parse_qs(url.query)
        service = query.get("service", [""])[0]
        scopes = query.get("scope", [])
        if service != TOKEN_SERVICE:
            h.reply(400, b'{"details": "unknown service"}')
            return
        user, password = _basic(h.headers.get("Authorization"))
        if user is None:
            access = [_grant(s, anonymous=True) for s in scopes]
            signer = self.issuer
        elif (user, password) == (USER, PASSWORD) or user == FORGER:
            access = [_grant(s, anonymous=False) for s in scopes]
            signer = self.forger if user == FORGER else self.issuer
        else:
            self._log(Issued(user, service, scopes, None))
            h.reply(401, b'{"details": "wrong user name or password"}')
            return
        self._log(Issued(user, service, scopes, access))
        token = signer.token(user or "", access)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 3600})
        h.reply(200, body.encode(), {"Content-Type": "application/json"})

    def _log(self, issued: Issued) -> None:
        with self.lock:
            self.issued.append(issued)

    def since(self, start: int) -> list[Issued]:
        with self.lock:
            return self.issued[start:]


def _basic(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, password


def _grant(scope: str, *, anonymous: bool) -> dict[str, object]:
    """`repository:NAME:ACTIONS` → the access entry this policy grants for it."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    wanted = [a for a in actions.split(",") if a]
    if anonymous:
        wanted = ["pull"] if "pull" in wanted and name in PUBLIC else []
    return {"type": kind, "name": name, "actions": wanted}


# ----- fixtures ---------------------------------------------------------------------------
@dataclass
class Setup:
    registry: Registry
    tokens: FakeServer
    policy: TokenPolicy

    def token_requests(self, start: int) -> list[Seen]:
        return [s for s in self.tokens.seen[start:] if s.path.startswith("/token")]


@contextlib.contextmanager
def token_registry(work: Path) -> Iterator[tuple[Registry, FakeServer, TokenPolicy]]:
    """A real registry that accepts only Bearer tokens, and the token server (FakeServer under
    a TokenPolicy) that issues them; yields (registry, token server, policy)."""
    require_tool("openssl", "openssl")
    issuer = TokenIssuer.create(work / "issuer")
    forger = TokenIssuer.create(work / "forger")  # the same issuer name, an untrusted key
    policy = TokenPolicy(issuer, forger)
    with FakeServer(policy) as tokens:

        def hook(config: dict[str, object]) -> None:
            config["auth"] = token_auth_config(f"{tokens.url}/token", issuer)
            config["log"] = {"level": "info", "accesslog": {"disabled": True}}

        with running_registry(work / "registry", config_hook=hook) as reg:
            yield reg, tokens, policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_tool("skopeo", "skopeo")
    work = tmp_path_factory.mktemp("tokenreg")
    oci = work / "oci"
    write_oci_layout(oci, {"v1": IMG})
    with token_registry(work) as (reg, tokens, policy):
        creds = f"{USER}:{PASSWORD}"
        for repo in ("test/img", "test/private"):
            skopeo_copy(f"oci:{oci}:v1", f"docker://{reg.host}/{repo}:v1", "--dest-creds", creds)
        yield Setup(reg, tokens, policy)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "store")


def _log(setup: Setup) -> str:
    return "registry log:\n" + setup.registry.log.read_text(errors="replace")[-4000:]


def _query(seen: Seen) -> dict[str, list[str]]:
    return parse_qs(urlsplit(seen.path).query)


# ----- tests ------------------------------------------------------------------------------
def test_registry_sends_bearer_challenge(setup):
    """The registry itself (not a fake) challenges with our realm, service and scope."""
    url = f"{setup.registry.url}/v2/test/img/manifests/v1"
    resp = httpx.get(url, headers={"Accept": OCI_MANIFEST})
    assert resp.status_code == 401
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{setup.tokens.url}/token"' in challenge
    assert f'service="{TOKEN_SERVICE}"' in challenge
    assert 'scope="repository:test/img:pull"' in challenge


def test_skopeo_push_went_through_the_token_server(setup):
    pushes = [i for i in setup.policy.since(0) if i.user == USER]
    scopes = {s for i in pushes for s in i.scopes}
    assert {"repository:test/img:pull,push", "repository:test/private:pull,push"} <= scopes


@pytest.mark.parametrize("repo", ["test/img", "test/private"])
def test_pull_with_credentials(setup, store, repo):
    start, issued = len(setup.tokens.seen), len(setup.policy.since(0))
    with RegistryClient(setup.registry.host, creds=(USER, PASSWORD)) as client:
        body, media_type, digest = client.get_manifest(repo, "v1")
        assert (body, media_type, digest) == (IMG.manifest, OCI_MANIFEST, IMG.manifest_digest)
        again = client.get_manifest(repo, str(digest))
        assert again == (body, media_type, digest)
        for data in (IMG.config, IMG.layer):
            d = Digest.of(data)
            assert client.fetch_blob(repo, d, len(data), store) == d
            assert store.read_blob(d) == data
    # one token, cached for the manifests and the blobs, asked for as the spec says
    [seen] = setup.token_requests(start)
    query = _query(seen)
    assert query["service"] == [TOKEN_SERVICE]
    assert query["scope"] == [f"repository:{repo}:pull"]
    assert query.get("account") == [USER]
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert seen.headers["authorization"] == expected
    [grant] = setup.policy.since(issued)
    assert grant.granted == [{"type": "repository", "name": repo, "actions": ["pull"]}]


def test_anonymous_pull_of_public_repository(setup, store):
    start = len(setup.tokens.seen)
    with RegistryClient(setup.registry.host) as client:
        assert client.get_manifest("test/img", "v1")[0] == IMG.manifest
        assert client.fetch_blob("test/img", IMG.layer_digest, len(IMG.layer), store)
    assert store.read_blob(IMG.layer_digest) == IMG.layer
    [seen] = setup.token_requests(start)
    assert "authorization" not in seen.headers
    assert _query(seen)["scope"] == ["repository:test/img:pull"]


def test_anonymous_private_repository_refused(setup):
    """The token server answers, but the token grants nothing: the registry says 401."""
    start = len(setup.tokens.seen)
    with RegistryClient(setup.registry.host) as client:
        with pytest.raises(AuthError, match="no credentials were found") as err:
            client.get_manifest("test/private", "v1")
    assert setup.registry.host in str(err.value)
    seen = setup.token_requests(start)
    assert 1 <= len(seen) <= 2, seen  # a refused token may be replaced once
    assert all(_query(s)["scope"] == ["repository:test/private:pull"] for s in seen)
    assert "insufficient scope" in _log(setup), _log(setup)


@pytest.mark.parametrize("creds", [(USER, "wrong"), ("nobody", PASSWORD)])
def test_wrong_credentials_refused_by_token_server(setup, creds):
    start = len(setup.tokens.seen)
    with RegistryClient(setup.registry.host, creds=creds) as client:
        with pytest.raises(AuthError, match=f"refused user {creds[0]!r}"):
            client.get_manifest("test/img", "v1")
    assert len(setup.token_requests(start)) == 1  # a refusal is not retried


def test_token_signed_by_untrusted_key_refused(setup):
    """The forger's token grants everything; only the registry's signature check stops it."""
    with RegistryClient(setup.registry.host, creds=(FORGER, "x")) as client:
        with pytest.raises(AuthError, match=f"refused the credentials of user {FORGER!r}"):
            client.get_manifest("test/img", "v1")
    assert "unable to verify certificate chain" in _log(setup), _log(setup)


def test_fixture_stops_everything(tmp_path):
    """running_registry and FakeServer stop their process and thread in `finally`."""
    issuer = TokenIssuer.create(tmp_path / "issuer")
    policy = TokenPolicy(issuer, issuer)
    with FakeServer(policy) as tokens:
        realm = f"{tokens.url}/token"

        def hook(config: dict[str, object]) -> None:
            config["auth"] = token_auth_config(realm, issuer)

        with pytest.raises(RuntimeError, match="boom"):
            with running_registry(tmp_path / "reg", config_hook=hook) as reg:
                proc = reg.proc
                raise RuntimeError("boom")
    assert proc.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(realm, timeout=1)

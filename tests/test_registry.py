"""RegistryClient against a real docker-registry (anonymous and htpasswd), and against fake
servers for what a real registry will not do on demand: drop a connection half way, ignore
Range, serve corrupt bytes, redirect elsewhere, demand Bearer tokens."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from imagestore import auth
from imagestore.digest import Digest
from imagestore.errors import (
    AuthError,
    BlobNotFound,
    DigestMismatch,
    ImageNotFound,
    RegistryError,
)
from imagestore.media import DOCKER_CONFIG, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from imagestore.registry import RegistryClient
from imagestore.store import Store
from tests.registry_util import (
    FakeServer,
    Handler,
    free_port,
    make_image,
    require_tool,
    running_registry,
    skopeo_copy,
    write_oci_layout,
)

USER, PASSWORD = "tester", "s3cret"
IMG = make_image({"hello.txt": b"hello from the registry\n", "big": bytes(range(256)) * 400})
AMD = make_image({"arch": b"amd64\n"}, "amd64")
ARM = make_image({"arch": b"arm64\n"}, "arm64")


pytestmark = pytest.mark.usefixtures("no_real_credentials")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("oci")
    indexes = write_oci_layout(path, {"v1": IMG}, {"multi": [AMD, ARM]})
    return path, indexes["multi"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, layout):
    require_tool("skopeo", "skopeo")
    oci, _ = layout
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        skopeo_copy(f"oci:{oci}:v1", f"docker://{reg.host}/test/img:v1")
        skopeo_copy(f"oci:{oci}:v1", f"docker://{reg.host}/test/img:v2s2", "--format", "v2s2")
        skopeo_copy(f"oci:{oci}:multi", f"docker://{reg.host}/test/img:multi", "--all")
        yield reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory, layout):
    require_tool("skopeo", "skopeo")
    oci, _ = layout
    with running_registry(tmp_path_factory.mktemp("authreg"), htpasswd=(USER, PASSWORD)) as reg:
        creds = f"{USER}:{PASSWORD}"
        skopeo_copy(f"oci:{oci}:v1", f"docker://{reg.host}/test/img:v1", "--dest-creds", creds)
        yield reg


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "store")


def record(into: list[tuple[int, int | None]]):
    return lambda done, total: into.append((done, total))


def stored(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir())


# ----- the real registry, anonymous -------------------------------------------------------
def test_manifest_by_tag_and_digest_oci(registry):
    with RegistryClient(registry.host) as client:
        body, media_type, digest = client.get_manifest("test/img", "v1")
        assert (body, media_type, digest) == (IMG.manifest, OCI_MANIFEST, IMG.manifest_digest)
        assert client.ping() == f"http://{registry.host}"
        again = client.get_manifest("test/img", str(digest))
        assert again == (body, media_type, digest)


def test_manifest_docker_schema2(registry):
    with RegistryClient(registry.host) as client:
        body, media_type, digest = client.get_manifest("test/img", "v2s2")
        assert media_type == DOCKER_MANIFEST
        assert digest == Digest.of(body)
        manifest = json.loads(body)
        assert manifest["config"]["mediaType"] == DOCKER_CONFIG
        assert manifest["config"]["digest"] == str(IMG.config_digest)
        assert manifest["layers"][0]["digest"] == str(IMG.layer_digest)
        assert client.get_manifest("test/img", str(digest)) == (body, media_type, digest)


def test_manifest_index(registry, layout):
    _, index = layout
    with RegistryClient(registry.host) as client:
        body, media_type, digest = client.get_manifest("test/img", "multi")
        assert (body, media_type, digest) == (index, OCI_INDEX, Digest.of(index))
        for img in (AMD, ARM):
            child = client.get_manifest("test/img", str(img.manifest_digest))
            assert child == (img.manifest, OCI_MANIFEST, img.manifest_digest)


def test_fetch_blobs(registry, store):
    seen: list[tuple[int, int | None]] = []
    with RegistryClient(registry.host) as client:
        for data in (IMG.config, IMG.layer):
            d = Digest.of(data)
            assert client.fetch_blob("test/img", d, len(data), store, record(seen)) == d
            assert store.read_blob(d) == data
            assert seen[-1] == (len(data), len(data))
        seen.clear()  # already there: no request, no progress
        assert client.fetch_blob("test/img", IMG.layer_digest, None, store, record(seen))
        assert seen == []
    assert stored(store) == sorted([IMG.config_digest.hex, IMG.layer_digest.hex])
    assert list(store.ingest_dir.iterdir()) == []


def test_fetch_blobs_from_threads(registry, store):
    blobs = [IMG.config, IMG.layer, AMD.layer, ARM.layer, AMD.config, ARM.config]
    errors: list[BaseException] = []
    with RegistryClient(registry.host) as client:

        def fetch(data: bytes) -> None:
            try:
                client.fetch_blob("test/img", Digest.of(data), len(data), store)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(b,)) for b in blobs * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert stored(store) == sorted({Digest.of(b).hex for b in blobs})


def test_not_found(registry, store):
    with RegistryClient(registry.host) as client:
        with pytest.raises(ImageNotFound, match="test/img:nope"):
            client.get_manifest("test/img", "nope")
        with pytest.raises(ImageNotFound, match="no/such"):
            client.get_manifest("no/such", "v1")
        missing = Digest.of(b"never pushed")
        with pytest.raises(ImageNotFound):
            client.get_manifest("test/img", str(missing))
        with pytest.raises(BlobNotFound, match=str(missing)):
            client.fetch_blob("test/img", missing, 12, store)
    assert stored(store) == []


def test_unreachable_names_host(store):
    host = f"127.0.0.1:{free_port()}"
    with RegistryClient(host, retries=0) as client, pytest.raises(RegistryError, match=host):
        client.get_manifest("test/img", "v1")


# ----- the real registry behind htpasswd (Basic) ------------------------------------------
def test_basic_auth_explicit(auth_registry, store):
    with RegistryClient(auth_registry.host, creds=(USER, PASSWORD)) as client:
        body, _, _ = client.get_manifest("test/img", "v1")
        assert body == IMG.manifest
        client.fetch_blob("test/img", IMG.layer_digest, len(IMG.layer), store)
        assert store.read_blob(IMG.layer_digest) == IMG.layer


def test_basic_auth_refused(auth_registry):
    with RegistryClient(auth_registry.host, creds=(USER, "wrong")) as client:
        with pytest.raises(AuthError, match=f"refused the credentials of user '{USER}'"):
            client.get_manifest("test/img", "v1")
    with RegistryClient(auth_registry.host) as client:
        with pytest.raises(AuthError, match="no credentials were found"):
            client.get_manifest("test/img", "v1")


def _auth_json(path: Path, key: str, user: str = USER, password: str = PASSWORD) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {key: {"auth": token}}}))


def test_basic_auth_docker_config(auth_registry, tmp_path):
    _auth_json(tmp_path / "home" / ".docker" / "config.json", f"http://{auth_registry.host}")
    with RegistryClient(auth_registry.host) as client:
        assert client.get_manifest("test/img", "v1")[0] == IMG.manifest


def test_basic_auth_registry_auth_file(auth_registry, tmp_path, monkeypatch):
    # REGISTRY_AUTH_FILE comes before ~/.docker/config.json, whose entry is wrong
    _auth_json(tmp_path / "home" / ".docker" / "config.json", auth_registry.host, USER, "old")
    _auth_json(tmp_path / "auth.json", f"{auth_registry.host}/test")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    with RegistryClient(auth_registry.host) as client:
        assert client.get_manifest("test/img", "v1")[0] == IMG.manifest


def test_basic_auth_env(auth_registry, monkeypatch):
    monkeypatch.setenv("LAYER_CREDS", f"{USER}:{PASSWORD}")
    with RegistryClient(auth_registry.host) as client:
        assert client.get_manifest("test/img", "v1")[0] == IMG.manifest


def test_registry_fixture_failure_stops_process(tmp_path):
    def break_config(config: dict[str, object]) -> None:
        config["storage"] = {"nosuchdriver": {}}

    with pytest.raises(RuntimeError, match="docker-registry exited"):
        with running_registry(tmp_path / "bad", config_hook=break_config):
            pass  # pragma: no cover


# ----- fake servers: resume, restart, corruption, redirects -------------------------------
BLOB = bytes(range(256)) * 1024  # 256 KiB
BLOB_D = Digest.of(BLOB)
HALF = len(BLOB) // 2
BLOB_PATH = f"/v2/r/blobs/{BLOB_D}"


def client_for(server: FakeServer, **kw) -> RegistryClient:
    return RegistryClient(server.host, backoff=0.01, **kw)


def blob_server(behaviour: str, first_drops: bool = True) -> FakeServer:
    """A registry whose first blob GET hangs up half way (if `first_drops`); later ones
    `behaviour`: 'range' honours Range, 'ignore' answers 200 with everything, 'drop' hangs up
    again."""
    count = {"blob": 0}

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        if h.path != BLOB_PATH:
            return h.reply(404)
        count["blob"] += 1
        if (count["blob"] == 1 and first_drops) or behaviour == "drop":
            return h.drop_after(200, BLOB, HALF, {})
        rng = h.headers.get("Range")
        if behaviour == "range" and rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            end = len(BLOB) - 1
            hdr = {"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"}
            return h.reply(206, BLOB[start:], hdr)
        return h.reply(200, BLOB)

    return FakeServer(respond)


def blob_requests(server: FakeServer) -> list[dict[str, str]]:
    return [s.headers for s in server.seen if s.path == BLOB_PATH]


def test_resume_after_dropped_connection(store):
    progress: list[tuple[int, int | None]] = []
    with blob_server("range") as server, client_for(server) as client:
        assert client.fetch_blob("r", BLOB_D, len(BLOB), store, record(progress)) == BLOB_D
        reqs = blob_requests(server)
    assert len(reqs) == 2
    assert "range" not in reqs[0]
    assert reqs[1]["range"] == f"bytes={HALF}-"
    assert store.read_blob(BLOB_D) == BLOB
    assert (HALF, len(BLOB)) in progress and progress[-1] == (len(BLOB), len(BLOB))
    assert list(store.ingest_dir.iterdir()) == []


def test_server_ignoring_range_restarts(store):
    with blob_server("ignore") as server, client_for(server) as client:
        assert client.fetch_blob("r", BLOB_D, len(BLOB), store) == BLOB_D
        reqs = blob_requests(server)
    assert [r.get("range") for r in reqs] == [None, f"bytes={HALF}-"]
    assert store.read_blob(BLOB_D) == BLOB


def test_partial_download_resumed_by_next_call(store):
    partial = store.ingest_dir / f"dl-{BLOB_D.hex}"
    with blob_server("drop") as server, client_for(server, retries=1) as client:
        with pytest.raises(RegistryError, match="gave up after 2 attempts"):
            client.fetch_blob("r", BLOB_D, len(BLOB), store)
    assert partial.stat().st_size == HALF  # kept for the next call
    assert stored(store) == []
    with blob_server("range", first_drops=False) as server, client_for(server) as client:
        client.fetch_blob("r", BLOB_D, len(BLOB), store)
        reqs = blob_requests(server)
    assert [r.get("range") for r in reqs] == [f"bytes={HALF}-"]
    assert store.read_blob(BLOB_D) == BLOB
    assert not partial.exists()


def test_stale_partial_file_is_refetched(store):
    partial = store.ingest_dir / f"dl-{BLOB_D.hex}"
    partial.write_bytes(b"\0" * 1000)  # garbage from some earlier run

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        rng = h.headers.get("Range")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        hdr = {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"} if rng else {}
        h.reply(206 if rng else 200, BLOB[start:], hdr)

    with FakeServer(respond) as server, client_for(server) as client:
        client.fetch_blob("r", BLOB_D, len(BLOB), store)
        reqs = blob_requests(server)
    assert [r.get("range") for r in reqs] == ["bytes=1000-", None]
    assert store.read_blob(BLOB_D) == BLOB


@pytest.mark.parametrize("corruption", ["flipped", "short", "long"])
def test_corrupt_blob(store, corruption):
    bad = {
        "flipped": b"X" + BLOB[1:],
        "short": BLOB[:-10],
        "long": BLOB + b"extra",
    }[corruption]

    def respond(h: Handler) -> None:
        h.reply(200) if h.path == "/v2/" else h.reply(200, bad)

    expected = (RegistryError, "closed after") if corruption == "short" else (DigestMismatch, None)
    with FakeServer(respond) as server, client_for(server, retries=1) as client:
        with pytest.raises(expected[0], match=expected[1]):
            client.fetch_blob("r", BLOB_D, len(BLOB), store)
    assert stored(store) == []
    if corruption != "short":  # a short read keeps its prefix for a resume; commit() decides
        assert list(store.ingest_dir.iterdir()) == []


def test_corrupt_blob_without_size(store):
    def respond(h: Handler) -> None:
        h.reply(200) if h.path == "/v2/" else h.reply(200, b"not the blob")

    with FakeServer(respond) as server, client_for(server) as client:
        with pytest.raises(DigestMismatch, match=str(BLOB_D)):
            client.fetch_blob("r", BLOB_D, None, store)
    assert stored(store) == []
    assert list(store.ingest_dir.iterdir()) == []


def _basic(h: Handler) -> bool:
    want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    if h.headers.get("Authorization") == want:
        return True
    h.reply(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'})
    return False


def test_redirect_to_other_host_drops_authorization(store):
    def storage(h: Handler) -> None:
        h.reply(200, BLOB)

    with FakeServer(storage) as cdn:

        def respond(h: Handler) -> None:
            if not _basic(h):
                return
            if h.path == "/v2/":
                return h.reply(200)
            if h.path == BLOB_PATH:
                return h.reply(307, b"", {"Location": "/elsewhere"})  # same origin
            if h.path == "/elsewhere":
                return h.reply(302, b"", {"Location": f"{cdn.url}/blob?sig=1"})
            h.reply(404)

        with FakeServer(respond) as server, client_for(server, creds=(USER, PASSWORD)) as c:
            c.fetch_blob("r", BLOB_D, len(BLOB), store)
            hops = [(s.path, "authorization" in s.headers) for s in server.seen]
        assert (BLOB_PATH, True) in hops and ("/elsewhere", True) in hops
        assert [(s.path, s.headers.get("authorization")) for s in cdn.seen] == [
            ("/blob?sig=1", None)
        ]
    assert store.read_blob(BLOB_D) == BLOB


def test_redirect_loop(store):
    def respond(h: Handler) -> None:
        h.reply(200) if h.path == "/v2/" else h.reply(302, b"", {"Location": h.path})

    with FakeServer(respond) as server, client_for(server) as client:
        with pytest.raises(RegistryError, match="too many redirects"):
            client.fetch_blob("r", BLOB_D, len(BLOB), store)


# ----- fake servers: manifests ------------------------------------------------------------
def manifest_server(
    body: bytes,
    header_digest: str | None,
    failures: int = 0,
    content_type: str = OCI_MANIFEST + "; charset=utf-8",
) -> FakeServer:
    state = {"left": failures}

    def respond(h: Handler) -> None:
        if h.path == "/v2/":
            return h.reply(200)
        if state["left"]:
            state["left"] -= 1
            return h.reply(503, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')
        hdr = {"Content-Type": content_type}
        if header_digest:
            hdr["Docker-Content-Digest"] = header_digest
        h.reply(200, body, hdr)

    return FakeServer(respond)


def test_manifest_retried_after_503():
    with manifest_server(IMG.manifest, str(IMG.manifest_digest), failures=2) as server:
        with client_for(server) as client:
            assert client.get_manifest("r", "t") == (
                IMG.manifest,
                OCI_MANIFEST,
                IMG.manifest_digest,
            )
        assert len(server.seen) == 4
    with manifest_server(IMG.manifest, None, failures=9) as server:
        with client_for(server, retries=2) as client:
            with pytest.raises(RegistryError, match="UNAVAILABLE: busy.*gave up after 3"):
                client.get_manifest("r", "t")


def test_manifest_digest_checks():
    wrong = str(Digest.of(b"something else"))
    with manifest_server(IMG.manifest, wrong) as server, client_for(server) as client:
        with pytest.raises(DigestMismatch, match="expected " + wrong):
            client.get_manifest("r", "t")
    with manifest_server(IMG.manifest, None) as server, client_for(server) as client:
        with pytest.raises(DigestMismatch):
            client.get_manifest("r", wrong)  # asked by digest, got other bytes
        assert client.get_manifest("r", "t")[2] == IMG.manifest_digest  # no header: computed


@pytest.mark.parametrize(
    "body,media_type",
    [
        (b'{"schemaVersion":2,"manifests":[]}', OCI_INDEX),
        (b'{"schemaVersion":2,"config":{},"layers":[]}', OCI_MANIFEST),
        (b'{"schemaVersion":2,"mediaType":"%s"}' % DOCKER_MANIFEST.encode(), DOCKER_MANIFEST),
    ],
)
def test_manifest_media_type_sniffed(body, media_type):
    """A server that sends a generic Content-Type: the type comes from the JSON."""
    with manifest_server(body, None, content_type="application/json") as server:
        with client_for(server) as client:
            assert client.get_manifest("r", "t") == (body, media_type, Digest.of(body))


def test_schema1_refused():
    body = b'{"schemaVersion":1,"name":"r","tag":"t","fsLayers":[]}'
    with manifest_server(body, None, content_type="application/json") as server:
        with client_for(server) as client, pytest.raises(RegistryError, match="schema 1"):
            client.get_manifest("r", "t")


# ----- fake servers: Bearer tokens --------------------------------------------------------
class TokenWorld:
    """A token server and a registry that wants its tokens (revocable, to test refresh)."""

    def __init__(self, creds: tuple[str, str] | None = None) -> None:
        self.creds = creds
        self.valid: set[str] = set()
        self.issued = 0
        self.lock = threading.Lock()
        self.tokens = FakeServer(self._token)
        self.registry = FakeServer(self._registry)

    def __enter__(self) -> TokenWorld:
        self.tokens.__enter__()
        self.registry.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.registry.__exit__(*exc)
        finally:
            self.tokens.__exit__(*exc)

    def _token(self, h: Handler) -> None:
        if self.creds is not None:
            user, password = self.creds
            want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if h.headers.get("Authorization") != want:
                return h.reply(401)
        scope = parse_qs(urlsplit(h.path).query).get("scope", [""])[0]
        with self.lock:
            self.issued += 1
            token = f"tok-{self.issued}-{scope}"
            self.valid.add(token)
        h.reply(200, json.dumps({"token": token, "expires_in": 300}).encode())

    def _registry(self, h: Handler) -> None:
        repo = h.path.split("/")[2] if h.path.count("/") > 2 else ""
        scope = f"repository:{repo}:pull" if repo else ""
        authz = h.headers.get("Authorization", "")
        token = authz.removeprefix("Bearer ")
        with self.lock:
            ok = authz.startswith("Bearer ") and token in self.valid and token.endswith(scope)
        if not ok:
            challenge = f'Bearer realm="{self.tokens.url}/token",service="fake"'
            if scope:
                challenge += f',scope="{scope}"'
            return h.reply(401, b"", {"WWW-Authenticate": challenge})
        if h.path == "/v2/":
            return h.reply(200)
        if h.path == f"/v2/{repo}/manifests/t":
            return h.reply(200, IMG.manifest, {"Content-Type": OCI_MANIFEST})
        h.reply(404)

    def revoke_all(self) -> None:
        with self.lock:
            self.valid.clear()

    def token_queries(self) -> list[dict[str, list[str]]]:
        return [parse_qs(urlsplit(s.path).query) for s in self.tokens.seen]


def test_bearer_anonymous_cached_and_refreshed():
    with TokenWorld() as world, client_for(world.registry) as client:
        for _ in range(3):
            assert client.get_manifest("r", "t")[0] == IMG.manifest
        assert world.token_queries() == [{"service": ["fake"], "scope": ["repository:r:pull"]}]
        assert all("authorization" not in s.headers for s in world.tokens.seen)
        client.get_manifest("other", "t")  # another scope: another token
        assert len(world.tokens.seen) == 2
        world.revoke_all()  # a 401 on a cached token: one new token, then success
        assert client.get_manifest("r", "t")[0] == IMG.manifest
        assert len(world.tokens.seen) == 3


def test_bearer_with_credentials():
    with TokenWorld((USER, PASSWORD)) as world:
        with client_for(world.registry, creds=(USER, PASSWORD)) as client:
            assert client.get_manifest("r", "t")[0] == IMG.manifest
        assert world.token_queries()[0]["account"] == [USER]
        with client_for(world.registry, creds=(USER, "wrong")) as client:
            with pytest.raises(AuthError, match="refused user 'tester'"):
                client.get_manifest("r", "t")
        with client_for(world.registry) as client:
            with pytest.raises(AuthError, match="refused anonymous access"):
                client.get_manifest("r", "t")


# ----- pure parts -------------------------------------------------------------------------
def test_parse_www_authenticate():
    got = auth.parse_www_authenticate(
        [
            'Bearer realm="https://auth.example.com/token",service="reg",'
            'scope="repository:a/b:pull,push", Basic realm="x \\"q\\""',
            "Negotiate",
            'basic realm=plain, charset="UTF-8"',
        ]
    )
    assert [(c.scheme, c.params) for c in got] == [
        (
            "bearer",
            {
                "realm": "https://auth.example.com/token",
                "service": "reg",
                "scope": "repository:a/b:pull,push",
            },
        ),
        ("basic", {"realm": 'x "q"'}),
        ("negotiate", {}),
        ("basic", {"realm": "plain", "charset": "UTF-8"}),
    ]


def test_lookup_credentials(tmp_path, monkeypatch):
    home = tmp_path / "home"
    _auth_json(home / ".docker" / "config.json", "https://index.docker.io/v1/", "hub", "p1")
    assert auth.lookup_credentials("registry-1.docker.io") == (
        ("hub", "p1"),
        str(home / ".docker" / "config.json"),
    )
    assert auth.lookup_credentials("quay.io") is None
    containers = home / ".config" / "containers" / "auth.json"
    token = base64.b64encode(b"team:p2").decode()
    other = base64.b64encode(b"all:p3").decode()
    containers.parent.mkdir(parents=True)
    containers.write_text(
        json.dumps({"auths": {"quay.io/team": {"auth": token}, "quay.io": {"auth": other}}})
    )
    assert auth.lookup_credentials("quay.io", "team/app")[0] == ("team", "p2")
    assert auth.lookup_credentials("quay.io", "else/app")[0] == ("all", "p3")
    runtime = tmp_path / "run"
    _auth_json(runtime / "containers" / "auth.json", "quay.io", "rt", "p4")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert auth.lookup_credentials("quay.io", "team/app")[0] == ("rt", "p4")
    monkeypatch.setenv("LAYER_CREDS", "env:p:5")
    assert auth.lookup_credentials("quay.io") == (("env", "p:5"), "LAYER_CREDS")
    monkeypatch.setenv("LAYER_CREDS", "nocolon")
    with pytest.raises(AuthError, match="LAYER_CREDS"):
        auth.lookup_credentials("quay.io")


@pytest.mark.parametrize(
    "host,tls_verify,schemes",
    [
        ("127.0.0.1:5000", True, ["http", "https"]),
        ("localhost", True, ["http", "https"]),
        ("[::1]:5000", False, ["http", "https"]),
        ("quay.io", True, ["https"]),
        ("quay.io", False, ["https", "http"]),  # skopeo --tls-verify=false
    ],
)
def test_scheme_order(host, tls_verify, schemes):
    with RegistryClient(host, tls_verify=tls_verify) as client:
        assert client.schemes() == schemes


def test_docker_hub_endpoint():
    with RegistryClient("docker.io") as client:
        assert client.host == "registry-1.docker.io"


def test_https_probe_falls_back_to_http(monkeypatch):
    """The insecure order (https without verification, then http) finds a plain-http
    registry; the fake server hangs up on the TLS handshake as a plain-http one would."""
    with manifest_server(IMG.manifest, None) as server:
        with RegistryClient(server.host, tls_verify=False) as client:
            monkeypatch.setattr(client, "schemes", lambda: ["https", "http"])
            assert client.ping() == server.url
            assert client.get_manifest("r", "t")[0] == IMG.manifest
        with RegistryClient(server.host) as client:
            monkeypatch.setattr(client, "schemes", lambda: ["https"])
            with pytest.raises(RegistryError, match=f"cannot reach registry {server.host}"):
                client.get_manifest("r", "t")

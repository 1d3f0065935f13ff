"""Docker reference parsing: docker's and skopeo's defaults and grammar, as a table."""

from __future__ import annotations

import pytest

from imagestore.digest import Digest
from imagestore.errors import BadReference
from imagestore.reference import (
    Reference,
    canonical_host,
    is_loopback,
    parse_reference,
    split_host_port,
)

D = "sha256:" + "ab" * 32
HUB = "registry-1.docker.io"

VALID = [
    # text, host, repository, tag, digest, canonical text
    ("alpine", HUB, "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("alpine:3.19", HUB, "library/alpine", "3.19", None, "docker.io/library/alpine:3.19"),
    ("library/alpine", HUB, "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("user/app:v1", HUB, "user/app", "v1", None, "docker.io/user/app:v1"),
    ("docker.io/alpine", HUB, "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("index.docker.io/x/y", HUB, "x/y", "latest", None, "docker.io/x/y:latest"),
    (f"alpine@{D}", HUB, "library/alpine", None, D, f"docker.io/library/alpine@{D}"),
    (f"alpine:3@{D}", HUB, "library/alpine", "3", D, f"docker.io/library/alpine:3@{D}"),
    ("quay.io/team/app", "quay.io", "team/app", "latest", None, "quay.io/team/app:latest"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None, "localhost:5000/a/b:t"),
    (
        "127.0.0.1:5000/test/img",
        "127.0.0.1:5000",
        "test/img",
        "latest",
        None,
        "127.0.0.1:5000/test/img:latest",
    ),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None, "[::1]:5000/x:y"),
    ("host:5000/a@" + D, "host:5000", "a", None, D, f"host:5000/a@{D}"),
    ("Registry/app", "Registry", "app", "latest", None, "Registry/app:latest"),  # upper: a host
    ("t-1/e--f_g.h__i", HUB, "t-1/e--f_g.h__i", "latest", None, "docker.io/t-1/e--f_g.h__i:latest"),
    (
        "localhost:5000",
        HUB,
        "library/localhost",
        "5000",
        None,
        "docker.io/library/localhost:5000",
    ),  # as docker: a name with a tag, not a host
    ("app:_Tag.1-x", HUB, "library/app", "_Tag.1-x", None, "docker.io/library/app:_Tag.1-x"),
]


@pytest.mark.parametrize("text,host,repo,tag,digest,canonical", VALID)
def test_valid(text, host, repo, tag, digest, canonical):
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag) == (host, repo, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert str(ref) == canonical
    assert parse_reference(str(ref)) == ref  # the canonical form round-trips


INVALID = [
    ("", "empty"),
    ("Alpine", "lowercase"),
    ("quay.io/Team/app", "lowercase"),
    ("alpine:", "invalid tag"),
    ("alpine:-x", "invalid tag"),
    ("alpine:" + "x" * 129, "invalid tag"),
    ("alpine@", "empty digest"),
    ("alpine@sha256:abc", "not a valid sha256 digest"),
    ("alpine@md5:" + "a" * 32, "not a digest"),
    ("https://quay.io/a", "no URL scheme"),
    ("quay.io/", "no repository"),
    ("a//b", "invalid repository"),
    ("a/b/", "invalid repository"),
    ("-a/b", "invalid repository"),
    ("a_/b", "invalid repository"),
    ("a b", "whitespace"),
    (" alpine", "whitespace"),
    ("bad_host.io:x/app", "invalid registry host"),
    ("a.b_c/app", "invalid registry host"),
    ("quay.io/" + "a" * 250, "longer than 255"),
]


@pytest.mark.parametrize("text,message", INVALID)
def test_invalid(text, message):
    with pytest.raises(BadReference, match=message):
        parse_reference(text)


@pytest.mark.parametrize(
    "text,url,insecure_url",
    [
        ("alpine", "https://registry-1.docker.io", "http://registry-1.docker.io"),
        ("quay.io/a", "https://quay.io", "http://quay.io"),
        ("localhost:5000/a", "http://localhost:5000", "http://localhost:5000"),
        ("127.0.0.1:5000/a", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.0.0.2/a", "http://127.0.0.2", "http://127.0.0.2"),
        ("[::1]:5000/a", "http://[::1]:5000", "http://[::1]:5000"),
        ("10.0.0.1:5000/a", "https://10.0.0.1:5000", "http://10.0.0.1:5000"),
    ],
)
def test_registry_url(text, url, insecure_url):
    ref = parse_reference(text)
    assert ref.registry_url == url
    assert ref.base_url(insecure=True) == insecure_url


def test_properties():
    ref = parse_reference(f"alpine:3@{D}")
    assert ref.domain == "docker.io"
    assert ref.name == "docker.io/library/alpine"
    assert ref.manifest_ref == D  # the digest wins over the tag
    assert parse_reference("alpine").manifest_ref == "latest"
    other = Digest.parse("sha256:" + "cd" * 32)
    assert ref.with_digest(other) == Reference(HUB, "library/alpine", "3", other)


def test_host_helpers():
    assert split_host_port("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert split_host_port("[::1]:5000") == ("::1", 5000)
    assert split_host_port("[::1]") == ("::1", None)
    assert split_host_port("quay.io") == ("quay.io", None)
    assert all(map(is_loopback, ["localhost", "LOCALHOST:1", "127.0.0.1", "127.1.2.3:5", "[::1]"]))
    assert not any(map(is_loopback, ["quay.io", "10.0.0.1:5000", "localhost.example.com"]))
    assert canonical_host("docker.io") == canonical_host("index.docker.io") == HUB
    assert canonical_host("quay.io") == "quay.io"

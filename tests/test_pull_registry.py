"""`layer pull docker://…` from the real docker-registry — anonymous, htpasswd Basic and token
auth — with images pushed by skopeo; the mounted image equals `umoci unpack` of the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagestore.store import Store
from tests import imagedata, treecmp
from tests.registry_util import (
    require_tool,
    running_registry,
    skopeo_copy,
)
from tests.test_pull import mounted_tree, same_as_umoci, umoci_tree
from tests.test_registry_token import PASSWORD, USER, token_registry

LAYER = str(Path(sys.executable).parent / "layer")


def layer(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LAYER, *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root)},
    )


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    require_tool("skopeo", "skopeo")
    root = tmp_path_factory.mktemp("images")
    imagedata.write_oci_layout(root / "sample", ref="v1")
    imagedata.write_oci_layout(root / "multi", ref="v1", platforms=["linux/amd64", "linux/arm64"])
    return root


@pytest.fixture(scope="module")
def anon(layouts, tmp_path_factory):
    with running_registry(tmp_path_factory.mktemp("anonreg")) as reg:
        skopeo_copy(f"oci:{layouts / 'sample'}:v1", f"docker://{reg.host}/test/sample:v1")
        skopeo_copy(
            f"oci:{layouts / 'sample'}:v1",
            f"docker://{reg.host}/test/sample:v2s2",
            "--format",
            "v2s2",
        )
        skopeo_copy(f"oci:{layouts / 'multi'}:v1", f"docker://{reg.host}/test/multi:v1", "--all")
        yield reg


def mounted(root: Path, image: str, mnt: Path) -> dict:
    return mounted_tree(Store.open(root), image, mnt)


@pytest.mark.mount
def test_pull_mount_equals_umoci(anon, layouts, tmp_path, fuse):
    root = tmp_path / "store"
    r = layer(root, "pull", "-q", f"docker://{anon.host}/test/sample:v1")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip()
    name = f"{anon.host}/test/sample:v1"
    assert str(Store.open(root).resolve(name).digest) == digest
    ours = mounted(root, name, tmp_path / "mnt")
    assert same_as_umoci(ours, umoci_tree(tmp_path, layouts / "sample", "v1")) == []
    # a Docker v2s2 copy of the same image: same layers (unpacked once), same tree
    r = layer(root, "pull", "-q", f"{anon.host}/test/sample:v2s2")
    assert r.returncode == 0, r.stderr
    info = json.loads(layer(root, "inspect", f"{anon.host}/test/sample:v2s2").stdout)
    assert info["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(list((root / "layers").iterdir())) == 3
    assert treecmp.diff(mounted(root, f"{anon.host}/test/sample:v2s2", tmp_path / "m2"), ours) == []


def test_pull_by_digest_and_platform(anon, tmp_path):
    root = tmp_path / "store"
    r = layer(
        root, "pull", "-q", "--platform", "linux/arm64", f"docker://{anon.host}/test/multi:v1"
    )
    assert r.returncode == 0, r.stderr
    store = Store.open(root)
    from imagestore.pull import image_layers

    base = image_layers(store, f"{anon.host}/test/multi:v1")[0]
    assert (base / "arm64.txt").read_bytes() == b"arm64"
    digest = r.stdout.strip()
    r = layer(root, "pull", "-q", f"docker://{anon.host}/test/multi@{digest}")
    assert r.returncode == 0 and r.stdout.strip() == digest, r.stderr


def test_missing_image_exits_2(anon, tmp_path):
    r = layer(tmp_path / "store", "pull", f"docker://{anon.host}/test/nothing:v1")
    assert r.returncode == 2 and r.stderr.startswith("layer: error:"), r.stderr


def test_basic_auth(layouts, tmp_path):
    with running_registry(tmp_path / "reg", htpasswd=("alice", "secret")) as reg:
        skopeo_copy(
            f"oci:{layouts / 'sample'}:v1",
            f"docker://{reg.host}/test/sample:v1",
            "--dest-creds",
            "alice:secret",
        )
        root = tmp_path / "store"
        src = f"docker://{reg.host}/test/sample:v1"
        denied = layer(root, "pull", "--creds", "alice:wrong", src)
        assert denied.returncode == 1 and "layer: error:" in denied.stderr
        assert Store.open(root).images() == []
        ok = layer(root, "pull", "-q", "--creds", "alice:secret", src)
        assert ok.returncode == 0, ok.stderr
        # credentials from an auth file, as podman/skopeo keep them
        auth = tmp_path / "auth.json"
        import base64

        token = base64.b64encode(b"alice:secret").decode()
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        r = subprocess.run(
            [LAYER, "pull", "-q", "--root", str(tmp_path / "s2"), src],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "REGISTRY_AUTH_FILE": str(auth)},
        )
        assert r.returncode == 0, r.stderr


def test_token_auth(layouts, tmp_path):
    with token_registry(tmp_path) as (reg, _tokens, policy):
        skopeo_copy(
            f"oci:{layouts / 'sample'}:v1",
            f"docker://{reg.host}/test/img:v1",
            "--dest-creds",
            f"{USER}:{PASSWORD}",
        )
        root = tmp_path / "store"
        r = layer(
            root,
            "pull",
            "-q",
            "--creds",
            f"{USER}:{PASSWORD}",
            f"docker://{reg.host}/test/img:v1",
        )
        assert r.returncode == 0, r.stderr
        assert any(i.user == USER and "repository:test/img:pull" in i.scopes for i in policy.issued)
        r = layer(root, "pull", "--creds", f"{USER}:nope", f"docker://{reg.host}/test/img:v1")
        assert r.returncode == 1 and "layer: error:" in r.stderr

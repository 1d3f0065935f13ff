"""`layer pull` from files (oci:, oci-archive:, docker-archive:), `layer mount IMAGE`, and the
image commands; the mounted tree is compared with `umoci unpack` of the same image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from imagestore.pull import pull
from imagestore.store import Store
from tests import imagedata, treecmp
from tests.mounts import IN_CI, is_mounted, lazy_unmount

LAYER = str(Path(sys.executable).parent / "layer")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"CI requires {name} (scripts/setup.sh installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def layer(*args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [LAYER, *args, "--root", str(root)]
        if args[0] not in ("mount",)
        else [LAYER, args[0], "--root", str(root), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "store")


def umoci_tree(tmp_path: Path, layout: Path, ref: str) -> dict:
    need_tool("umoci")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)],
        check=True,
        capture_output=True,
    )
    return treecmp.snapshot(bundle / "rootfs")


def mounted_tree(store: Store, image: str, mnt: Path) -> dict:
    mnt.mkdir(exist_ok=True)
    layer("mount", image, str(mnt), "--read-only", root=store.root)
    try:
        return treecmp.snapshot(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        if is_mounted(mnt):
            lazy_unmount(str(mnt))


def same_as_umoci(ours: dict, theirs: dict) -> list[str]:
    return [p for p in treecmp.diff(ours, theirs, compare_mtime=False) if not p.startswith("b'/'")]


@pytest.mark.mount
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_pull_oci_layout_and_mount_equals_umoci(tmp_path, store, fuse, compression):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout, compression=compression)
    result = pull(store, f"oci:{layout}:latest", name="sample")
    assert result.name == "sample" and len(result.diff_ids) == 3
    ours = mounted_tree(store, "sample", tmp_path / "mnt")
    assert b"/etc/motd" not in ours and b"/opt/gone" not in ours
    assert ours[b"/var/cache"].names == [b"fresh"]
    reference = tmp_path / "reference"  # umoci 0.4 reads no zstd: the same layers, gzipped
    imagedata.write_oci_layout(reference, compression="gzip")
    assert same_as_umoci(ours, umoci_tree(tmp_path, reference, "latest")) == []


@pytest.mark.mount
def test_docker_types_and_docker_archive(tmp_path, store, fuse):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout, docker_types=True)
    pull(store, f"oci:{layout}", name="v2s2")
    archive = tmp_path / "image.tar"
    imagedata.write_docker_archive(archive)
    r = layer("pull", "-q", f"docker-archive:{archive}", root=store.root)
    digest = r.stdout.strip()
    assert digest.startswith("sha256:")
    names = [
        i["name"] for i in json.loads(layer("images", "--format", "json", root=store.root).stdout)
    ]
    assert sorted(names) == ["sample:1", "v2s2"]
    a = mounted_tree(store, "sample:1", tmp_path / "mnt")
    b = mounted_tree(store, "v2s2", tmp_path / "mnt2")
    assert treecmp.diff(a, b) == []
    # layers are shared: the archive's layers were already unpacked by the first pull
    assert len(list(store.layers.iterdir())) == 3


def test_index_picks_the_platform(tmp_path, store):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout, platforms=["linux/amd64", "linux/arm64"])
    pull(store, f"oci:{layout}", name="arm", platform="linux/arm64")
    from imagestore.pull import image_layers

    base = image_layers(store, "arm")[0]
    assert (base / "arm64.txt").read_bytes() == b"arm64"
    r = layer("pull", "--platform", "linux/s390x", f"oci:{layout}", root=store.root, check=False)
    assert r.returncode == 2 and "linux/s390x" in r.stderr and "Traceback" not in r.stderr


def test_oci_archive(tmp_path, store):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout, ref="v1")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    pull(store, f"oci-archive:{archive}:v1", name="arch")
    assert [n for n, _ in store.images()] == ["arch"]


def test_store_is_an_oci_layout_for_skopeo_and_umoci(tmp_path, store):
    need_tool("skopeo")
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout)
    pull(store, f"oci:{layout}", name="sample")
    out = tmp_path / "copy"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", f"oci:{store.root}:sample", f"oci:{out}:x"],
        check=True,
        capture_output=True,
    )
    assert (out / "index.json").exists()
    if shutil.which("umoci"):
        ls = subprocess.run(
            ["umoci", "ls", "--layout", str(store.root)], capture_output=True, text=True, check=True
        )
        assert "sample" in ls.stdout


def test_image_commands_and_gc(tmp_path, store):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout)
    layer("pull", "-q", f"oci:{layout}", "--name", "one", root=store.root)
    layer("tag", "one", "two", root=store.root)
    assert layer("images", "-q", root=store.root).stdout.split()[0].startswith("sha256:")
    info = json.loads(layer("inspect", "two", root=store.root).stdout)
    assert len(info["layers"]) == 3 and all(x["unpacked"] for x in info["layers"])
    raw = layer("inspect", "--raw", "two", root=store.root).stdout
    assert json.loads(raw)["schemaVersion"] == 2
    missing = layer("inspect", "nope", root=store.root, check=False)
    assert missing.returncode == 2 and "layer: error:" in missing.stderr
    layer("rmi", "one", root=store.root)
    assert "removed 0 blobs" in layer("gc", root=store.root).stdout  # "two" keeps them
    layer("rmi", "two", root=store.root)
    assert "removed 5 blobs and 3 unpacked layers" in layer("gc", root=store.root).stdout
    assert list(store.blobs.iterdir()) == [] and list(store.layers.iterdir()) == []


def test_bad_sources_are_clean_errors(tmp_path, store):
    for src, code in [
        (f"oci:{tmp_path}/none", 2),
        (f"docker-archive:{tmp_path}/none.tar", 2),
        ("ftp://x/y", 2),
        ("bad name!", 2),
    ]:
        r = layer("pull", src, root=store.root, check=False)
        assert r.returncode == code, (src, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("layer: error:")


@pytest.mark.mount
def test_writable_mount_keeps_its_upper(tmp_path, store, fuse):
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout)
    pull(store, f"oci:{layout}", name="img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert layer("mount", "img", str(mnt), "--name", "c1", root=store.root).stdout == "c1\n"
        (mnt / "etc/hostname").write_text("changed\n")
        os.unlink(mnt / "etc/passwd")
        ps = json.loads(layer("ps", "--format", "json", root=store.root).stdout)
        assert ps == [
            {
                "name": "c1",
                "image": "img",
                "digest": ps[0]["digest"],
                "mountpoint": str(mnt),
                "read_only": False,
                "state": "live",
                "live": True,
            }
        ]
        layer("umount", "c1", root=store.root)
        assert not is_mounted(mnt)
        layer("mount", "img", str(mnt), "--name", "c1", root=store.root)
        assert (mnt / "etc/hostname").read_text() == "changed\n"
        assert not (mnt / "etc/passwd").exists()
        busy = layer("rm", "c1", root=store.root, check=False)
        assert busy.returncode == 1
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            lazy_unmount(str(mnt))
    layer("rm", "c1", root=store.root)
    assert not (store.mounts / "c1").exists()

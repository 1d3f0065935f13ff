"""Oracle test: layerfs and kernel overlayfs on the same layers must show the same tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import layerdata, treecmp
from tests.mounts import KernelOverlay, LayerfsMount, require_fuse, require_root

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    require_root()
    require_fuse()
    root = tmp_path_factory.mktemp("oracle")
    mixed = layerdata.build_sample(root / "mixed")
    kernel = [
        layerdata.to_kernel_format(p, root / "kernel" / p.name)
        for p in ((root / "kernel").mkdir() or mixed)
    ]
    return root, mixed, kernel


@pytest.fixture(scope="module")
def kernel_tree(layers):
    root, _mixed, kernel = layers
    (root / "kmnt").mkdir()
    with KernelOverlay(root / "kmnt", kernel):
        return treecmp.snapshot(root / "kmnt")


@pytest.fixture(scope="module", params=["mixed", "kernel"])
def layerfs_tree(request, layers):
    root, mixed, kernel = layers
    mnt = root / f"lmnt-{request.param}"
    mnt.mkdir()
    with LayerfsMount(mnt, mixed if request.param == "mixed" else kernel) as m:
        tree = treecmp.snapshot(mnt)
        assert m.proc is not None and m.proc.poll() is None, m.log()
        return tree


def test_tree_equals_kernel_overlayfs(layerfs_tree, kernel_tree):
    problems = treecmp.diff(layerfs_tree, kernel_tree)
    assert problems == [], "\n".join(problems[:50])


def test_markers_never_visible(layerfs_tree):
    for path, obj in layerfs_tree.items():
        name = path.rsplit(b"/", 1)[-1]
        assert not name.startswith(b".wh."), path
        assert not (obj.kind == "chardev" and obj.rdev == 0), path
        assert not any(
            k.startswith((b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs."))
            for k in obj.xattrs
        ), path


def test_expected_view(layerfs_tree):
    t = layerfs_tree
    assert b"/etc/issue" not in t and b"/opt/gone" not in t
    assert t[b"/etc/motd"].content == treecmp.hashlib.sha256(b"new motd\n").hexdigest()
    assert t[b"/var/cache"].names == [b"new"]
    assert t[b"/var/lib"].names == [b"x"]
    assert t[b"/var/log"].names == []
    assert t[b"/var/spool"].names == [b"g"]
    assert t[b"/var/tmp"].names == [] and t[b"/var/tmp"].mode == 0o755  # the top dir's
    assert t[b"/opt/dirtofile"].kind == "file"
    assert t[b"/opt/filetodir"].names == [b"z"]
    assert t[b"/srv/merged"].names == [b"m0", b"m1", b"m2", b"sub"]
    assert t[b"/srv/merged"].xattrs == {}  # the topmost (l2) directory has none
    assert t[b"/srv/xw"].names == [b"kept"]
    assert t[b"/srv/recreated"].names == [b"new"]
    assert t[b"/bin/su"].mode == 0o4755
    assert t[b"/etc/passwd"].xattrs == {b"user.test": b"hello"}
    assert t[b"/data/sparse"].size == (64 << 20) + 3
    assert len(t[b"/many"].names) == 300


def test_inode_numbers(layerfs_tree):
    t = layerfs_tree
    assert treecmp.inode_problems(t) == []
    # hard links in a layer share one inode and the real link count
    assert t[b"/bin/link2"].ino == t[b"/etc/link3"].ino
    assert t[b"/hl/one"].ino == t[b"/hl/two"].ino and t[b"/hl/one"].nlink == 2
    files = [(o.ino, p) for p, o in t.items() if o.kind != "dir"]
    by_ino: dict[int, list[bytes]] = {}
    for ino, p in files:
        by_ino.setdefault(ino, []).append(p)
    shared = {tuple(sorted(v)) for v in by_ino.values() if len(v) > 1}
    assert shared == {(b"/bin/link2", b"/etc/link3"), (b"/hl/one", b"/hl/two")}
    dir_inos = [o.ino for o in t.values() if o.kind == "dir"]
    assert len(dir_inos) == len(set(dir_inos))


def test_directory_link_counts(layerfs_tree):
    for path, obj in layerfs_tree.items():
        if obj.kind == "dir":
            assert obj.nlink == 2 + treecmp.subdir_count(layerfs_tree, path), path


def test_one_st_dev(layers):
    root, mixed, _ = layers
    mnt = root / "devmnt"
    mnt.mkdir()
    with LayerfsMount(mnt, mixed):
        devs = {
            os.lstat(mnt / p).st_dev
            for p in ("", "etc/motd", "etc/passwd", "srv/merged", "hl/one", "dev/fifo")
        }
        assert len(devs) == 1
        assert Path(mnt / "etc/motd").read_bytes() == b"new motd\n"

"""Issue 12, item 9: trees deeper than Python's recursion limit (and than PATH_MAX) are
walked iteratively: pull, gc, diff (changeset) and commit never raise RecursionError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagestore import changeset, fstree
from imagestore.store import Store
from tests import imagedata

LAYER = str(Path(sys.executable).parent / "layer")


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest's own clean-up of old temp dirs uses shutil.rmtree, which these trees break."""
    yield
    for p in list(tmp_path.iterdir()):
        fstree.remove_tree(p)


def deep_chain(top: Path, depth: int, leaf: bytes = b"f") -> None:
    """top/d/d/…/d (depth levels) holding a file `leaf`, made with openat (any depth)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"deep")
        os.close(wfd)
    finally:
        os.close(fd)


def layer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAYER, *args], capture_output=True, text=True, timeout=120)


def deep_entries(depth: int, top: str = "") -> list[tuple]:
    dirs = [top + "/".join(["d"] * i) + "/" for i in range(1, depth + 1)]
    return [(d, "dir", None) for d in dirs] + [(dirs[-1] + "f", "file", b"deep")]


def test_fstree_removes_any_depth_and_read_only_dirs(tmp_path):
    top = tmp_path / "t"
    top.mkdir()
    deep_chain(top, 3000)
    (top / "link").symlink_to(tmp_path / "keep")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_bytes(b"x")
    os.chmod(top / "d", 0o500)
    fstree.remove_tree(top)
    assert not top.exists()
    assert (tmp_path / "keep" / "x").read_bytes() == b"x"  # a symlink is never followed
    fstree.remove_tree(top)  # nothing there is fine


def test_pull_of_a_layer_past_path_max_is_one_error_and_gc_works(tmp_path):
    """3,000 levels: 6,000 bytes, past the 4,096 a layer may hold.  The pull is refused with
    one line; the half-applied tree is removed; gc works afterwards."""
    imagedata.write_oci_layout(tmp_path / "lay", [deep_entries(3000)])
    root = str(tmp_path / "store")
    proc = layer_cli("pull", "--root", root, f"oci:{tmp_path}/lay:latest")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "longer than 4096" in proc.stderr
    assert [p.name for p in (tmp_path / "store" / "layers").iterdir()] == []
    gc = layer_cli("gc", "--root", root)
    assert gc.returncode == 0, gc.stderr


def test_pull_of_a_2000_deep_layer_and_a_file_replacing_it(tmp_path):
    """2,000 levels (inside the limits) pull; a later entry replacing the tree's top with a
    file removes the tree (the OCI apply rule) without recursion; gc of it works too."""
    entries = deep_entries(2000, "a/") + [("a/", "dir", None)]
    replaced = deep_entries(1500, "b/") + [("b", "file", b"now a file")]
    imagedata.write_oci_layout(tmp_path / "lay", [entries, replaced])
    root = tmp_path / "store"
    proc = layer_cli("pull", "--root", str(root), "--name", "deep", f"oci:{tmp_path}/lay:latest")
    assert proc.returncode == 0, proc.stderr
    layers = sorted(p for p in (root / "layers").iterdir())
    assert len(layers) == 2
    assert any((p / "diff" / "b").is_file() for p in layers)
    assert layer_cli("rmi", "--root", str(root), "deep").returncode == 0
    gc = layer_cli("gc", "--root", str(root))
    assert gc.returncode == 0, gc.stderr
    assert list((root / "layers").iterdir()) == []


def test_gc_removes_deep_debris(tmp_path):
    store = Store.open(tmp_path / "store")
    debris = store.layers / ".tmp-deadbeef"
    debris.mkdir()
    deep_chain(debris, 3000)
    scratch = store.ingest_dir / "verify-0123456789abcdef"
    scratch.mkdir()
    deep_chain(scratch, 3000)
    gc = layer_cli("gc", "--root", str(store.root))
    assert gc.returncode == 0, gc.stderr
    assert not debris.exists() and not scratch.exists()


@pytest.mark.parametrize("depth", [1500])
def test_changes_and_commit_of_a_deep_upper(tmp_path, depth):
    """The upper a user made through a mount, `mkdir -p` 1,500 deep (diff and commit)."""
    from imagestore.commit import CommitOptions, commit
    from imagestore.pull import image_layers

    store, lowers = imagedata.pulled_sample(tmp_path / "img")
    upper = tmp_path / "upper"
    upper.mkdir()
    deep_chain(upper, depth)
    deep = "/" + "/".join(["d"] * depth)
    got = changeset.changes(upper, lowers)
    assert f"{deep}/f" in got.added and len(got.added) == depth + 1
    commit(store, upper, lowers, "base", "deep", CommitOptions(verify=True))
    top = image_layers(store, "deep")[-1]
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.stat("f", dir_fd=fd).st_size == 4
    finally:
        os.close(fd)

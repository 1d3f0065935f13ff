"""`layer diff`, a live `layer commit` of a mounted image, and `layer push` to files: the
committed image, unpacked by umoci, equals the tree the user saw through the mount."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from tests import imagedata, treecmp
from tests.mounts import is_mounted, lazy_unmount
from tests.test_pull import LAYER, layer, need_tool, same_as_umoci, umoci_tree

pytestmark = pytest.mark.mount


@contextlib.contextmanager
def mounted_base(tmp_path, name, *options):
    """The sample image pulled by `layer pull` into tmp_path/store as `base` and mounted on
    tmp_path/mnt by `layer mount --name NAME [OPTIONS]`; yields (store root, mountpoint) and
    always unmounts."""
    root = tmp_path / "store"
    layout = tmp_path / "layout"
    imagedata.write_oci_layout(layout)
    layer("pull", "-q", f"oci:{layout}", "--name", "base", root=root)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer("mount", "base", str(mnt), "--name", name, *options, root=root)
    try:
        yield root, mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            lazy_unmount(str(mnt))


def test_live_commit_and_push(tmp_path, fuse):
    need_tool("umoci")
    with mounted_base(tmp_path, "work1") as (root, mnt):
        (mnt / "etc/hostname").write_text("committed\n")
        os.unlink(mnt / "etc/passwd")
        os.mkdir(mnt / "srv/new")
        (mnt / "srv/new/file").write_bytes(b"new file")
        os.rename(mnt / "usr/bin", mnt / "usr/sbin")
        out = layer("diff", "work1", root=root).stdout.splitlines()
        assert "C /etc/hostname" in out and "D /etc/passwd" in out
        assert "A /srv/new/file" in out and "D /usr/bin" in out
        js = json.loads(layer("diff", "--format", "json", "work1", root=root).stdout)
        assert "/srv/new" in js["added"]
        r = layer(
            "commit",
            "-m",
            "a change",
            "--change",
            "ENV A=b",
            "--verify",
            "work1",
            "new:1",
            root=root,
        )
        digest = r.stdout.strip()
        assert digest.startswith("sha256:")
        view = treecmp.snapshot(mnt)
        (mnt / "after-commit").write_text("the mount goes on\n")  # not frozen any more
    info = json.loads(layer("inspect", "new:1", root=root).stdout)
    assert "A=b" in info["config"]["config"]["Env"] and len(info["layers"]) == 4
    assert info["config"]["history"][-1]["comment"] == "a change"
    out = tmp_path / "pushed"
    layer("push", "new:1", f"oci:{out}:new", root=root)
    assert same_as_umoci(view, umoci_tree(tmp_path, out, "new")) == []
    archive = tmp_path / "new.tar"
    layer("push", "new:1", f"docker-archive:{archive}:new:1", root=root)
    layer("pull", "-q", f"docker-archive:{archive}", root=tmp_path / "store2")


def test_commit_of_a_metacopy_mount(tmp_path, fuse):
    """`layer mount -o metacopy=on`: chmod, chown and mv copy lower files up without their
    data (the upper holds holes marked overlay.metacopy); the committed layer holds their
    bytes, and umoci unpacks the image to the tree the mount showed."""
    need_tool("umoci")
    with mounted_base(tmp_path, "mc", "-o", "metacopy=on") as (root, mnt):
        os.chmod(mnt / "etc/passwd", 0o600)
        os.chown(mnt / "etc/hostname", 1, 1)
        os.rename(mnt / "etc/new.conf", mnt / "srv/new.conf")
        os.rename(mnt / "etc/hostname", mnt / "srv/hostname")  # chowned, then moved
        view = treecmp.snapshot(mnt)
        upper = root / "mounts/mc/upper"
        assert "trusted.overlay.metacopy" in os.listxattr(upper / "etc/passwd")  # holes
        layer("commit", "mc", "meta:1", root=root)
    out = tmp_path / "pushed"
    layer("push", "meta:1", f"oci:{out}:meta", root=root)
    assert same_as_umoci(view, umoci_tree(tmp_path, out, "meta")) == []


def test_live_commit_while_writing_then_registry_round_trip(tmp_path, fuse):
    """A process appends 4 KiB records while the mount is committed: the committed file holds
    whole records only, nothing written is lost, and the image survives a push to the real
    registry and a pull into a fresh store."""
    import threading

    from imagestore.pull import image_layers
    from imagestore.store import Store
    from tests.registry_util import running_registry

    need_tool("skopeo")
    stop = threading.Event()
    written = []
    with mounted_base(tmp_path, "w") as (root, mnt):

        def writer():
            with open(mnt / "srv/log", "ab") as f:
                i = 0
                while not stop.is_set():
                    f.write(b"%04095d\n" % i)  # one 4 KiB record per write(2)
                    f.flush()
                    written.append(i)
                    i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            while len(written) < 50:
                pass
            layer("commit", "--compress", "none", "w", "snap:1", root=root)
            n_after_commit = len(written)
            while len(written) < n_after_commit + 50:
                pass  # writes go on after the commit
        finally:
            stop.set()
            t.join(timeout=30)
    final = (root / "mounts/w/upper/srv/log").read_bytes()
    assert len(final) == 4096 * len(written)  # nothing lost
    store = Store.open(root)
    snap = image_layers(store, "snap:1")[-1] / "srv/log"
    data = snap.read_bytes()
    assert len(data) % 4096 == 0 and 0 < len(data) <= len(final)  # whole records only
    assert final.startswith(data)
    with running_registry(tmp_path / "reg") as reg:
        layer("push", "--tls-verify", "false", "snap:1", f"docker://{reg.host}/t/snap:1", root=root)
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{reg.host}/t/snap:1"],
            check=True,
            capture_output=True,
        )
        fresh = tmp_path / "fresh"
        layer("pull", "-q", f"docker://{reg.host}/t/snap:1", "--name", "snap", root=fresh)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    from tests.test_pull import mounted_tree

    a = mounted_tree(Store.open(root), "snap:1", m1)
    b = mounted_tree(Store.open(fresh), "snap", m2)
    assert [p for p in treecmp.diff(a, b) if not p.startswith("b'/':")] == []  # root: unpack time


def test_commit_where_sigchld_is_ignored(tmp_path, fuse):
    """`layer commit` run by a parent that ignores SIGCHLD (the disposition survives exec):
    its layer-building child is reaped by the kernel, and the commit still succeeds."""
    import signal

    with mounted_base(tmp_path, "work3") as (root, mnt):
        (mnt / "srv/ignored").write_bytes(b"sigchld ignored")
        r = subprocess.run(
            [LAYER, "commit", "--root", str(root), "work3", "new:3"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN),
        )
        assert r.returncode == 0, r.stderr
    out = layer("diff", "work3", root=root).stdout
    assert "A /srv/ignored" in out
    info = json.loads(layer("inspect", "new:3", root=root).stdout)
    assert len(info["layers"]) == 4

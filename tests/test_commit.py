"""Commit: changes through a real layerfs mount → changeset tar → image, then umoci, a fresh
pull and a mount must all reproduce the mounted tree."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagestore import commit as commit_mod
from imagestore.changeset import changes, write_changeset
from imagestore.commit import (
    BadChange,
    CommitOptions,
    VerifyFailed,
    apply_changes,
    commit,
    parse_change,
)
from imagestore.digest import Digest
from imagestore.errors import ImageNotFound
from imagestore.pull import image_layers, pull
from imagestore.store import Store, Transaction
from tests import imagedata, treecmp
from tests.layerdata import opaque, whiteout, write
from tests.mounts import LayerfsMount, require_fuse, require_root

SDE = 1_700_000_000


def _mutate(m: Path) -> None:
    """Every kind of change, made through the mount."""
    write(m / "new/dir/file", b"brand new")  # added, in new directories
    with open(m / "etc/passwd", "ab") as f:  # modified lower file
        f.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
    os.unlink(m / "etc/hostname")  # deleted lower file
    shutil.rmtree(m / "var/cache")  # deleted lower directory
    shutil.rmtree(m / "srv")  # directory → file
    write(m / "srv", b"srv is a file now")
    os.unlink(m / "etc/new.conf")  # file → directory
    write(m / "etc/new.conf/inside", b"inside")
    shutil.rmtree(m / "run")  # directory → file → directory again
    write(m / "run", b"file for a moment")
    os.unlink(m / "run")
    write(m / "run/x", b"x")
    os.rename(m / "usr/bin", m / "usr/sbin")  # rename a lower directory
    write(m / "usr/sbin/extra", b"extra")
    os.unlink(m / "usr/sbin/t")
    os.chmod(m / "opt", 0o700)  # chmod of a lower directory
    os.link(m / "etc/passwd", m / "etc/passwd.link")  # hard link
    os.setxattr(m / "etc/passwd", "user.foo", b"bar")  # xattr
    os.chown(m / "etc/passwd", 1000, 1000)
    os.symlink("../etc/passwd", m / "new/link")
    os.mkfifo(m / "new/fifo")
    os.mknod(m / "new/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_root()
    require_fuse()
    tmp = tmp_path_factory.mktemp("commit")
    store, lowers = imagedata.pulled_sample(tmp)
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with LayerfsMount(mnt, list(reversed(lowers)), upper, work):
        _mutate(mnt)
        view = treecmp.snapshot(mnt)
    return {"tmp": tmp, "store": store, "lowers": lowers, "upper": upper, "view": view}


def _same(got: dict, want: dict) -> list[str]:
    got = {k: v for k, v in got.items() if k != b"/"}
    want = {k: v for k, v in want.items() if k != b"/"}
    return treecmp.diff(got, want, compare_mtime=False)


def _tar(env) -> bytes:
    buf = io.BytesIO()
    write_changeset(env["upper"], env["lowers"], buf, SDE)
    return buf.getvalue()


def test_changes(env):
    c = changes(env["upper"], env["lowers"])
    assert c.deleted == ["/etc/hostname", "/usr/bin", "/var/cache"]
    assert c.changed == [
        "/etc",
        "/etc/new.conf",
        "/etc/passwd",
        "/opt",
        "/run",
        "/srv",
        "/usr",
        "/var",
    ]
    assert c.added == [
        "/etc/new.conf/inside",
        "/etc/passwd.link",
        "/new",
        "/new/dir",
        "/new/dir/file",
        "/new/fifo",
        "/new/link",
        "/new/null",
        "/run/x",
        "/usr/sbin",
        "/usr/sbin/extra",
        "/usr/sbin/tool",
        "/usr/sbin/tool2",
    ]


def test_changeset_tar(env):
    data = _tar(env)
    assert data == _tar(env)  # reproducible
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert len(names) == len(set(names))
    for i, m in enumerate(members):
        parent, _, base = m.name.rpartition("/")
        assert m.uname == "" and m.gname == ""
        assert m.mtime <= SDE
        assert not any("overlay" in k for k in m.pax_headers)
        if base == ".wh..wh..opq":
            assert names[i - 1] == parent and members[i - 1].isdir()
        elif base.startswith(".wh."):
            siblings = [
                j
                for j, n in enumerate(names)
                if n.rpartition("/")[0] == parent and not n.rpartition("/")[2].startswith(".wh.")
            ]
            assert all(j > i for j in siblings), m.name
    by = {m.name: m for m in members}
    assert "usr/.wh.bin" in by and "etc/.wh.hostname" in by and "var/.wh.cache" in by
    assert "run/.wh..wh..opq" in by  # a lower directory was replaced: its content must go
    assert "etc/new.conf/.wh..wh..opq" not in by  # only a file was below: the entry replaces it
    assert by["usr/sbin/tool2"].islnk() and by["usr/sbin/tool2"].linkname == "usr/sbin/tool"
    assert by["etc/passwd.link"].islnk() and by["etc/passwd.link"].linkname == "etc/passwd"
    assert by["etc/passwd"].pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert (by["etc/passwd"].uid, by["etc/passwd"].gid) == (1000, 1000)
    assert by["opt"].isdir() and by["opt"].mode == 0o700
    assert by["new/link"].issym() and by["new/link"].linkname == "../etc/passwd"
    assert by["new/fifo"].isfifo()
    assert by["new/null"].ischr() and (by["new/null"].devmajor, by["new/null"].devminor) == (1, 3)
    assert by["srv"].isfile()


@pytest.fixture(scope="module")
def committed(env):
    out = {}
    for comp in ("gzip", "zstd", "none"):
        out[comp] = commit(
            env["store"],
            env["upper"],
            env["lowers"],
            "base",
            f"new-{comp}",
            CommitOptions(
                message="my change",
                author="me",
                changes=('CMD ["/bin/echo", "hi"]', "ENV A=1"),
                compress=comp,
                source_date_epoch=SDE,
                verify=True,
            ),
        )
    return out


@pytest.mark.parametrize("comp", ["gzip", "zstd", "none"])
def test_umoci_unpack_equals_view(env, committed, comp, tmp_path):
    store = env["store"]
    desc = store.resolve(f"new-{comp}")
    assert desc.digest == committed[comp]
    manifest = json.loads(store.read_blob(committed[comp]))
    want_type = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[comp]
    assert manifest["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar" + (
        want_type
    )
    config = store.read_json(Digest.parse(manifest["config"]["digest"]))
    assert config["config"]["Cmd"] == ["/bin/echo", "hi"]
    assert "A=1" in config["config"]["Env"]
    assert config["history"][-1]["comment"] == "my change"
    assert config["history"][-1]["author"] == "me"
    assert len(config["rootfs"]["diff_ids"]) == 4
    if shutil.which("umoci") is None:
        pytest.skip("umoci is missing")
    bundle = tmp_path / "bundle"
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{store.root}:new-{comp}", str(bundle)],
        capture_output=True,
        text=True,
    )
    if comp == "zstd" and "not correct mediatype" in r.stderr:
        pytest.skip(f"this umoci does not read zstd layers: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert _same(treecmp.snapshot(bundle / "rootfs"), env["view"]) == []


def test_fresh_pull_and_mount(env, committed, tmp_path):
    store2 = Store.open(tmp_path / "store2")
    pull(store2, f"oci:{env['store'].root}:new-gzip", name="copy")
    layers = image_layers(store2, "copy")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with LayerfsMount(mnt, list(reversed(layers))):
        got = treecmp.snapshot(mnt)
    assert _same(got, env["view"]) == []


def test_registered_layer_mounts(env, committed, tmp_path):
    store = env["store"]
    layers = image_layers(store, "new-zstd")
    assert all(store.has_layer(Digest("sha256", p.parent.name)) for p in layers)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with LayerfsMount(mnt, list(reversed(layers))):
        got = treecmp.snapshot(mnt)
    assert _same(got, env["view"]) == []


def test_reproducible(env, committed):
    again = commit(
        env["store"],
        env["upper"],
        env["lowers"],
        "base",
        "again",
        CommitOptions(
            message="my change",
            author="me",
            changes=('CMD ["/bin/echo", "hi"]', "ENV A=1"),
            source_date_epoch=SDE,
        ),
    )
    assert again == committed["gzip"]


def test_verify_with_live_view(env, committed, tmp_path):
    tmp = tmp_path
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    subprocess.run(["cp", "-a", str(env["upper"]), str(upper)], check=True)
    for d in (work, mnt):
        d.mkdir()
    with LayerfsMount(mnt, list(reversed(env["lowers"])), upper, work):
        commit(
            env["store"],
            upper,
            env["lowers"],
            "base",
            "live",
            CommitOptions(verify=True, merged_view=mnt),
        )
    assert env["store"].resolve("live")


def _blobs(store: Store) -> set[str]:
    return {p.name for p in store.blobs.iterdir()}


def test_verify_mismatch_writes_nothing(env, committed, tmp_path):
    store = env["store"]
    before, layers_before = _blobs(store), set(os.listdir(store.layers))
    other = tmp_path / "other"
    write(other / "unexpected", b"x")
    with pytest.raises(VerifyFailed):
        commit(
            store,
            env["upper"],
            env["lowers"],
            "base",
            "bad",
            CommitOptions(verify=True, merged_view=other),
        )
    with pytest.raises(ImageNotFound):
        store.resolve("bad")
    assert _blobs(store) == before
    assert set(os.listdir(store.layers)) == layers_before


def test_interrupted_commit_leaves_nothing(env, committed, monkeypatch):
    store = env["store"]
    before, layers_before = _blobs(store), set(os.listdir(store.layers))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Transaction, "tag", boom)  # interrupted at the last step
    with pytest.raises(KeyboardInterrupt):
        commit(
            store,
            env["upper"],
            env["lowers"],
            "base",
            "interrupted",
            CommitOptions(message="unique"),
        )
    with pytest.raises(ImageNotFound):
        store.resolve("interrupted")
    assert _blobs(store) == before
    assert set(os.listdir(store.layers)) == layers_before
    assert not [p for p in store.ingest_dir.iterdir() if p.name.startswith("tmp-")]


# ----- without a mount -------------------------------------------------------------------
def test_docker_base_keeps_docker_types(tmp_path):
    require_root()
    store, lowers = imagedata.pulled_sample(tmp_path, docker_types=True)
    upper = tmp_path / "upper"
    write(upper / "etc/added", b"a")
    whiteout(upper / "etc/passwd")
    opaque(upper / "opt")
    write(upper / "opt/fresh", b"f")
    assert changes(upper, lowers).deleted == ["/etc/passwd"]
    digest = commit(
        store, upper, lowers, "base", "d", CommitOptions(verify=True, source_date_epoch=SDE)
    )
    manifest = json.loads(store.read_blob(digest))
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert manifest["layers"][-1]["mediaType"].endswith("diff.tar.gzip")
    digest = commit(store, upper, lowers, "base", "z", CommitOptions(compress="zstd", verify=True))
    manifest = json.loads(store.read_blob(digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert {d["mediaType"] for d in manifest["layers"][:-1]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }


def test_unneeded_whiteout_and_opaque_are_dropped(tmp_path):
    lower = tmp_path / "lower"
    write(lower / "a/kept", b"k")
    upper = tmp_path / "upper"
    whiteout(upper / "nothing-below")
    opaque(upper / "fresh")
    write(upper / "fresh/f", b"f")
    c = changes(upper, [lower])
    assert c.deleted == [] and c.added == ["/fresh", "/fresh/f"]
    buf = io.BytesIO()
    write_changeset(upper, [lower], buf, None)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        assert tar.getnames() == ["fresh", "fresh/f"]


@pytest.mark.parametrize(
    "text, want",
    [
        ('CMD ["a", "b"]', ("Cmd", ["a", "b"])),
        ("CMD echo hi there", ("Cmd", ["/bin/sh", "-c", "echo hi there"])),
        ('ENTRYPOINT ["/init"]', ("Entrypoint", ["/init"])),
        ("ENV A=1 B='two words'", ("Env", {"A": "1", "B": "two words"})),
        ("ENV A some value", ("Env", {"A": "some value"})),
        ("LABEL org.x=y", ("Labels", {"org.x": "y"})),
        ("WORKDIR /srv", ("WorkingDir", "/srv")),
        ("user nobody", ("User", "nobody")),
    ],
)
def test_parse_change(text, want):
    assert parse_change(text) == want


@pytest.mark.parametrize(
    "text", ["CMD", "RUN make", 'CMD ["a", 1]', "CMD [oops", "LABEL =x", "ENV A", ""]
)
def test_bad_change(text):
    with pytest.raises(BadChange):
        parse_change(text)


def test_apply_changes():
    config = {"config": {"Env": ["A=0", "PATH=/bin"], "Labels": {"x": "1"}}}
    apply_changes(config, [parse_change("ENV A=1"), parse_change("LABEL y=2")])
    assert config["config"]["Env"] == ["PATH=/bin", "A=1"]
    assert config["config"]["Labels"] == {"x": "1", "y": "2"}
    assert commit_mod.parse_change("WORKDIR /w")[1] == "/w"

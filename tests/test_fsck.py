"""Fingerprints, `layer fsck [--repair]`, `layer which`, `layer df` and progress bars (issue 15).

Tiers: the fingerprints module alone (format, order, deep trees); fsck and repair on stores
built by pulling the sample image (real unpacks); the CLI in subprocesses, with real mounts
for repair-under-a-mount, the mount-equals-umoci check and `which` on a redirect; progress
bars through a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import stat
import struct
import subprocess
import tarfile
import termios
import time
from pathlib import Path

import pytest

from imagestore import fingerprints, fsck, fstree
from imagestore.pull import image_layers
from imagestore.store import Store
from imagestore.unpack import unpack_layer
from tests import imagedata
from tests.test_mount_records import clean_error, ok, run, unmount
from tests.test_pull import LAYER, mounted_tree, same_as_umoci, umoci_tree


@pytest.fixture
def sample(tmp_path) -> tuple[Store, list[Path]]:
    return imagedata.pulled_sample(tmp_path)


def _walk(diff: Path) -> list[fingerprints.Entry]:
    fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list(fingerprints.walk(fd, lambda d, n, st: fingerprints.hash_file(d, n)))
    finally:
        os.close(fd)


def _fp(diff: Path) -> list[fingerprints.Entry]:
    return list(fingerprints.read(diff.parent / fingerprints.FILE_NAME))


# ----- the fingerprints themselves -----------------------------------------------------------
def test_unpack_records_what_a_walk_of_the_tree_finds(sample):
    store, layers = sample
    for diff in layers:
        recorded = _fp(diff)
        assert recorded == _walk(diff)  # content digests from the stream = read back
        paths = [e.path for e in recorded]
        assert paths == sorted(paths, key=fingerprints.sort_key) and paths[0] == b""
    base = {e.path: e for e in _fp(layers[0])}
    assert base[b"usr/bin/tool2"].link == b"usr/bin/tool" and base[b"usr/bin/tool"].link == b""
    assert base[b"usr/bin/t"].target == b"tool"
    assert stat.S_ISFIFO(base[b"run/fifo"].mode)
    middle = {e.path: e for e in _fp(layers[1])}
    wh = middle[b"etc/motd"]
    assert stat.S_ISCHR(wh.mode) and wh.rdev == 0  # the whiteout, as a 0/0 char device
    assert any(n.endswith(b"overlay.opaque") for n, _ in middle[b"var/cache"].xattrs)
    assert fsck.check(store).problems == []


def test_sparse_and_xattr_members_fingerprint_as_read_back(tmp_path):
    store = Store.open(tmp_path / "store")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("x")
        info.size = 5
        info.pax_headers = {"SCHILY.xattr.user.note": "hello"}
        tf.addfile(info, io.BytesIO(b"12345"))
    blob = store.put_bytes(buf.getvalue())
    diff_id = unpack_layer(store, blob, "application/vnd.oci.image.layer.v1.tar")
    diff = store.layer_dir(diff_id)
    assert _fp(diff) == _walk(diff)
    entry = {e.path: e for e in _fp(diff)}[b"x"]
    assert entry.xattrs == ((b"user.note", b"hello"),)


def test_deep_tree_walk_holds_few_fds(tmp_path):
    d = tmp_path / "deep"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    cur = os.dup(fd)
    for _ in range(1500):  # deeper than RLIMIT_NOFILE's usual 1024
        os.mkdir("d", dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=cur))
    os.close(cur)
    try:
        entries = list(fingerprints.walk(fd, lambda d, n, st: fingerprints.hash_file(d, n)))
    finally:
        os.close(fd)
        fstree.remove_tree(d)  # pytest's own clean-up recurses per level
    assert len(entries) == 1502 and entries[-1].path.endswith(b"d/f")


def test_damaged_or_unknown_fingerprints_file_is_a_problem(sample):
    store, layers = sample
    fp = layers[0].parent / fingerprints.FILE_NAME
    data = fp.read_bytes()
    fp.write_bytes(data[: len(data) // 2])
    problems = fsck.check(store).problems
    assert [p.kind for p in problems] == ["fingerprints"] or (
        problems and all(p.subject.endswith(layers[0].parent.name) for p in problems)
    )
    fp.write_bytes(fingerprints.MAGIC + (99).to_bytes(4, "little"))
    (problem,) = fsck.check(store).problems
    assert "version 99" in problem.message


# ----- fsck and repair -------------------------------------------------------------------------
def _damage(diff: Path) -> None:
    """Flip one byte, chmod one file, add one, delete one."""
    data = bytearray((diff / "etc/passwd").read_bytes())
    data[0] ^= 0x20
    st = os.stat(diff / "etc/passwd")
    (diff / "etc/passwd").write_bytes(bytes(data))
    os.utime(diff / "etc/passwd", ns=(st.st_atime_ns, st.st_mtime_ns))  # content alone
    os.chmod(diff / "usr/bin/tool", 0o700)
    (diff / "usr/bin/intruder").write_bytes(b"x")
    os.unlink(diff / "var/cache/b")


def test_fsck_names_a_flipped_byte_a_chmod_an_added_and_a_deleted_file(sample):
    store, layers = sample
    assert run(store.root, "fsck").returncode == 0
    _damage(layers[0])
    r = run(store.root, "fsck")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "changed etc/passwd: content" in r.stdout
    assert "changed usr/bin/tool: mode 0755 -> 0700" in r.stdout
    assert "extra usr/bin/intruder (file)" in r.stdout
    assert "missing var/cache/b (file)" in r.stdout
    assert r.stderr == ""  # not a terminal: no progress, nothing else
    doc = json.loads(run(store.root, "fsck", "--json").stdout)
    assert {p["kind"] for p in doc["problems"]} == {"layer"}
    assert all("repair" in p for p in doc["problems"])
    quiet = run(store.root, "fsck", "-q")
    assert quiet.returncode == 1 and all(
        ln.startswith("layer ") for ln in quiet.stdout.splitlines()
    )


def test_repair_restores_the_layer_and_the_mount_equals_umoci(tmp_path, sample, fuse):
    store, layers = sample
    _damage(layers[0])
    inode_before = os.stat(layers[0]).st_ino
    r = run(store.root, "fsck", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repaired: layer" in r.stdout
    assert os.stat(store.layer_dir(Digest_of(layers[0]))).st_ino != inode_before  # swapped
    assert run(store.root, "fsck").returncode == 0
    assert not [p for p in store.layers.iterdir() if p.name.startswith(".")]  # no debris
    ours = mounted_tree(store, "base", tmp_path / "mnt")
    assert same_as_umoci(ours, umoci_tree(tmp_path, tmp_path / "src", "latest")) == []


def Digest_of(diff: Path):  # noqa: N802 - reads as a type
    from imagestore.digest import Digest

    return Digest("sha256", diff.parent.name)


def test_corrupt_blob_is_reported_and_not_repaired(sample):
    store, layers = sample
    blob = next(p for p in store.blobs.iterdir() if p.stat().st_size > 500)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    r = run(store.root, "fsck")
    assert r.returncode == 1
    assert f"blob sha256:{blob.name} is corrupt" in r.stdout
    r = run(store.root, "fsck", "--repair")
    assert r.returncode == 1 and f"sha256:{blob.name} is corrupt" in r.stdout


def test_layer_without_fingerprints_is_a_note_and_repair_makes_them(sample):
    store, layers = sample
    fp = layers[1].parent / fingerprints.FILE_NAME
    fp.unlink()
    r = run(store.root, "fsck")
    assert r.returncode == 0, r.stdout
    assert "no fingerprints" in r.stdout and "--repair" in r.stdout
    ino = os.stat(layers[1]).st_ino
    r = run(store.root, "fsck", "--repair")
    assert r.returncode == 0 and "fingerprints made from blob" in r.stdout, r.stdout
    assert os.stat(layers[1]).st_ino == ino  # the tree stayed: only the file was added
    assert _fp(layers[1]) == _walk(layers[1])
    assert "no fingerprints" not in run(store.root, "fsck").stdout
    # a layer without fingerprints that was also changed: repair re-unpacks it
    fp.unlink()
    (layers[1] / "etc/new.conf").write_bytes(b"tampered\n")
    r = run(store.root, "fsck", "--repair")
    assert r.returncode == 0 and "re-unpacked" in r.stdout, r.stdout
    assert (layers[1] / "etc/new.conf").read_bytes() == b"new\n"


@pytest.mark.mount
def test_repair_refuses_a_layer_under_a_live_mount_unless_forced(tmp_path, fuse):
    imagedata.write_oci_layout(tmp_path / "layout")
    root = tmp_path / "store"
    ok(root, "pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "base")
    mnt = tmp_path / "m1"
    mnt.mkdir()
    try:
        ok(root, "mount", "base", str(mnt), "--name", "busy")
        store = Store.open(root)
        diff = image_layers(store, "base")[0]
        _damage(diff)
        r = run(root, "fsck", "--repair")
        assert r.returncode == 1
        assert "in use by live mount busy on" in r.stdout and str(mnt) in r.stdout
        assert (diff / "usr/bin/intruder").exists()  # untouched
        r = run(root, "fsck", "--repair", "--force")
        assert r.returncode == 0, r.stdout
        assert not (diff / "usr/bin/intruder").exists()
        assert run(root, "fsck").returncode == 0
    finally:
        unmount(mnt)


def test_fsck_bad_input_is_one_line(sample):
    store, _ = sample
    clean_error(run(store.root, "fsck", "no-such-image"), code=2)


def test_fsck_checks_mount_records(sample):
    store, _ = sample
    rec_dir = store.mounts / "m"
    rec_dir.mkdir()
    (rec_dir / "mount.json").write_text("{not json")
    r = run(store.root, "fsck")
    assert r.returncode == 1 and "mount record" in r.stdout and "damaged" in r.stdout


# ----- which -----------------------------------------------------------------------------------
def _which(root: Path, target: str, path: str) -> dict:
    return json.loads(ok(root, "which", "--json", target, path))


def test_which_on_the_sample_stacks_whiteout_and_opaque(sample):
    store, _ = sample
    root = store.root
    motd = _which(root, "base", "/etc/motd")  # base file, whited out by layer 2
    assert not motd["present"]
    assert [(r["rule"], r["layer"]) for r in motd["decided_by"]] == [("whiteout", 1)]
    assert [(v["layer"], v["kind"]) for v in motd["hides"]] == [(2, "file")]
    cache = _which(root, "base", "/var/cache")  # opaque in layer 2
    assert cache["present"] and cache["layer"] == 1 and cache["layers"] == [1]
    assert [(r["rule"], r["layer"]) for r in cache["decided_by"]] == [("opaque", 1)]
    assert cache["hides"] == [{"layer": 2, "kind": "directory"}]
    assert cache["entries_from"] == {"1": 1}
    below = _which(root, "base", "/var/cache/a")  # hidden by the opaque parent
    assert not below["present"] and below["decided_by"][0]["rule"] == "opaque"
    etc = _which(root, "base", "/etc")  # merged from all three
    assert etc["layers"] == [0, 1, 2] and etc["hides"] == []
    host = _which(root, "base", "/etc/hostname")  # top file over the base one
    assert host["layer"] == 0 and host["hides"] == [{"layer": 2, "kind": "file"}]
    text = ok(root, "which", "base", "/etc/motd")
    assert "whiteout" in text and "layer 2 (sha256:" in text and "layer 1 (sha256:" in text


@pytest.mark.mount
def test_which_follows_a_redirect_in_a_mounts_upper(tmp_path, fuse):
    imagedata.write_oci_layout(tmp_path / "layout")
    root = tmp_path / "store"
    ok(root, "pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "base")
    mnt = tmp_path / "m1"
    mnt.mkdir()
    try:
        ok(root, "mount", "base", str(mnt), "--name", "w")
        os.rename(mnt / "usr/bin", mnt / "usr/moved")
        listing = sorted(os.listdir(mnt / "usr/moved"))
        moved = _which(root, "w", "/usr/moved")
        assert moved["present"] and moved["layer"] == 0  # the upper
        assert [r["rule"] for r in moved["decided_by"]] == ["redirect"]
        assert "/usr/bin" in moved["decided_by"][0]["detail"]
        assert 3 in moved["layers"]  # the base layer's usr/bin, reached by the redirect
        assert sum(moved["entries_from"].values()) == len(listing)
        gone = _which(root, "w", "/usr/bin")
        assert not gone["present"] and gone["decided_by"][0]["rule"] == "whiteout"
        assert gone["decided_by"][0]["layer"] == 0
        assert "upper of mount w" in ok(root, "which", "w", "/usr/moved")
    finally:
        unmount(mnt)


# ----- df --------------------------------------------------------------------------------------
def _du(path: Path) -> int:
    out = subprocess.run(["du", "-x", "-s", "-B1", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0])


@pytest.mark.mount
def test_df_adds_up_against_du(tmp_path, fuse):
    imagedata.write_oci_layout(tmp_path / "layout")
    root = tmp_path / "store"
    ok(root, "pull", "-q", f"oci:{tmp_path / 'layout'}", "--name", "base")
    ok(root, "tag", "base", "again")
    mnt = tmp_path / "m1"
    mnt.mkdir()
    try:
        ok(root, "mount", "base", str(mnt), "--name", "w")
        (mnt / "srv/big").write_bytes(os.urandom(300_000))
        doc = json.loads(ok(root, "df", "--json"))
        assert doc["total"] == sum(doc["parts"].values()) == _du(root)
        assert doc["parts"]["blobs"] == _du(root / "blobs")
        assert doc["parts"]["layers"] == _du(root / "layers")
        assert doc["parts"]["uppers"] == _du(root / "mounts/w/upper") >= 300_000
        (mount,) = doc["mounts"]
        assert mount["name"] == "w" and mount["upper"] == doc["parts"]["uppers"]
        images = {i["name"]: i for i in doc["images"]}
        assert images["base"]["unique"] == 0 and images["base"]["shared"] > 0  # all shared
        assert "duplicated across layers" in ok(root, "df")
    finally:
        unmount(mnt)


def test_df_counts_files_duplicated_across_layers(tmp_path):
    store = Store.open(tmp_path / "store")
    same = os.urandom(10_000)
    for name in ("a", "b", "c"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path, data in ((f"{name}.txt", name.encode()), ("lib/same.so", same)):
                info = tarfile.TarInfo(path)
                info.size, info.mtime = len(data), 1_600_000_000
                tf.addfile(info, io.BytesIO(data))
        unpack_layer(
            store, store.put_bytes(buf.getvalue()), "application/vnd.oci.image.layer.v1.tar"
        )
    doc = json.loads(ok(store.root, "df", "--json"))
    assert doc["dedup"] == {
        "duplicate_files": 2,
        "duplicate_bytes": 20_000,
        "layers_without_fingerprints": 0,
    }


# ----- progress --------------------------------------------------------------------------------
def _in_pty(args: list[str], timeout: float = 60) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); returns (code, stdout, tty)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # as a terminal
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read() if proc.stdout else b""
    return proc.wait(timeout=10), out, seen


def test_progress_bars_only_on_a_terminal(tmp_path, sample):
    store, _ = sample
    code, out, tty = _in_pty([LAYER, "fsck", "--root", str(store.root)])
    assert code == 0 and b"no problems" in out
    assert b"blobs (" in tty and b"B/s" in tty  # tqdm drew the bars
    code, out, tty = _in_pty([LAYER, "fsck", "--root", str(store.root), "--json"])
    assert code == 0 and tty == b"" and json.loads(out)["problems"] == []
    code, out, tty = _in_pty([LAYER, "fsck", "--root", str(store.root), "-q"])
    assert code == 0 and tty == b"" and out == b""
    layout = tmp_path / "src"
    code, out, tty = _in_pty([LAYER, "pull", "--root", str(tmp_path / "s2"), f"oci:{layout}"])
    assert code == 0 and out.startswith(b"sha256:") and b"layer 1" in tty, tty
    piped = subprocess.run(
        [LAYER, "pull", "-q", "--root", str(tmp_path / "s3"), f"oci:{layout}"],
        capture_output=True,
    )
    assert piped.returncode == 0 and piped.stderr == b""


def test_pull_into_a_pipe_writes_nothing_extra(tmp_path):
    imagedata.write_oci_layout(tmp_path / "layout")
    r = subprocess.run(
        [LAYER, "pull", "--root", str(tmp_path / "s"), f"oci:{tmp_path / 'layout'}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.startswith("sha256:")
    assert "\r" not in r.stderr and "%|" not in r.stderr

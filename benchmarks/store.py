"""Store workloads: `layer pull` versus `skopeo copy` + `umoci unpack`, and `layer commit`
versus `umoci repack`, on the same image served by a real docker-registry on 127.0.0.1.

Two images, each built once and cached under the benchmark data dir:
  - the sample: 3 gzip layers, N small files (`build_image`);
  - Debian: a bookworm minbase rootfs made by debootstrap from deb.debian.org (one gzip
    layer, ~6,700 entries, 128 MB; apt's lists and logs removed, as the official image's build
    does), with the .deb files debootstrap fetched kept beside it: a commit round extracts the
    first packages by name (~3,200 entries) over the rootfs, which is what apt-get writes
    when it reinstalls them (`build_debian_image`; needs debootstrap and the network).  Like
    dpkg, the extraction keeps the rootfs's symlinks to directories (merged /usr: /bin, /lib,
    /sbin → usr/...): `tar --keep-directory-symlink`.  Plain `dpkg-deb -x` (GNU tar's default)
    replaces them with directories holding only those packages' files, a broken image; the
    runs before 2026-12-03 10:15 UTC did that.
`StoreBench` owns the registry, one image and a store holding it; each `*_round` call times one
of ours and one of theirs back to back — in alternating order from round to round, each after
`sync`, so neither always runs right after the other's writes or deletes — records each
command's peak RSS (`peak_rss`) and leaves nothing behind.  Single-threaded; root only (umoci
unpack as root).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.dataset import CACHE
from benchmarks.registry import need_tool, running_registry, skopeo_copy
from imagestore.layout_writer import write_oci_image

LAYER = str(Path(sys.executable).parent / "layer")
TIME = "/usr/bin/time"  # GNU time (Debian package `time`): a command's peak RSS
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_COMMIT_ENTRIES = 3000  # a commit round extracts packages until this many tar entries


def build_image(root: Path, files: int) -> None:
    """An OCI layout of 3 gzip layers with `files` files in all (~3 KB each), cached."""
    if (root / "index.json").exists():
        return
    tars = []
    rnd = os.urandom(1 << 20)
    for li in range(3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(files // 3):
                size = (i * 7919) % 8192
                info = tarfile.TarInfo(f"usr/share/l{li}/d{i % 50}/f{i}")
                info.size = size
                info.mtime = 1_600_000_000
                off = (i * 4099) % ((1 << 20) - 8192)
                tf.addfile(info, io.BytesIO(rnd[off : off + size]))
        tars.append(buf.getvalue())
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_oci_image(tmp, tars, "v1")
    tmp.rename(root)


def build_debian_image(root: Path) -> None:
    """root/oci: an OCI layout (tag v1) of a Debian minbase rootfs; root/debs: the .deb files
    of a commit round (see the module docstring).  Cached; built in root.partial first."""
    if (root / "oci" / "index.json").exists():
        return
    need_tool("debootstrap", "debootstrap")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rootfs = tmp / "rootfs"
    (tmp / "debs").mkdir(parents=True)
    _run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR])
    debs = sorted((rootfs / "var/cache/apt/archives").glob("*.deb"))
    entries = 0
    for deb in debs:
        if entries < DEBIAN_COMMIT_ENTRIES:
            listing = subprocess.run(
                ["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True
            ).stdout
            entries += len(listing.splitlines())
            shutil.copy2(deb, tmp / "debs")
        deb.unlink()
    for junk in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file() or p.is_symlink():
                p.unlink()
    tar = subprocess.run(
        [
            "tar",
            "--numeric-owner",
            "--format=pax",
            "--sort=name",
            "-C",
            str(rootfs),
            "-cf",
            "-",
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout
    write_oci_image(tmp / "oci", [tar], "v1")
    shutil.rmtree(rootfs)
    tmp.rename(root)


def _install_debs(debs: Path, root: Path) -> None:
    """What apt-get writes when it reinstalls these packages: their files, over `root`,
    through its symlinks to directories as dpkg goes (see the module docstring)."""
    for deb in sorted(debs.glob("*.deb")):
        data = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
        ).stdout
        subprocess.run(
            [
                "tar",
                "-x",
                "-p",
                "--same-owner",
                "--keep-directory-symlink",
                "-f",
                "-",
                "-C",
                str(root),
            ],
            input=data,
            check=True,
            capture_output=True,
        )


def _touch(root: Path, files: int) -> None:
    """Rewrite about 1,000 of the image's files (a third of them when the image is small)."""
    n = min(files, 3000)
    for i in range(0, n, max(1, n // 1000)):
        p = root / f"usr/share/l{i % 3}/d{(i // 3) % 50}/f{i // 3}"
        if p.exists():
            p.write_bytes(b"changed %d\n" % i)


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _timed(cmd: list[str], sync: bool = True) -> tuple[float, int]:
    """Run `cmd` after a sync (unless `sync` is false: the second step of a pipeline, whose
    first step's writes are part of what is timed); its wall time in seconds and its peak
    RSS in bytes.  The RSS
    comes from GNU time, not from our own wait4: a child forked from this (big) Python
    process starts with its RSS high-water mark, which exec keeps, so every command would
    show at least ours."""
    with tempfile.NamedTemporaryFile("r", prefix="rss-") as out:
        if sync:
            os.sync()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%M", "-o", out.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        took = time.perf_counter() - t0
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=proc.stderr)
        return took, int(out.read().split()[-1]) * 1024


class StoreBench(contextlib.AbstractContextManager["StoreBench"]):
    """`files` > 0: the sample image of that many files; 0: the Debian image."""

    def __init__(self, files: int, base: Path = CACHE) -> None:
        self.files = files
        self.debian = files == 0
        self.image = (
            base / f"debian-{DEBIAN_SUITE}" / "oci" if self.debian else base / f"image-{files}"
        )
        self.label = f"Debian {DEBIAN_SUITE} minbase" if self.debian else f"{files:,} files"
        self._stack = contextlib.ExitStack()
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.work = Path(tempfile.mkdtemp(prefix="store-", dir=base))
        self._stack.callback(shutil.rmtree, self.work, True)
        self.rounds = 0
        self.peak_rss: dict[str, int] = {}  # "pull layer", "pull umoci", ... → bytes, max

    def __enter__(self) -> StoreBench:
        if self.debian:
            build_debian_image(self.image.parent)
        else:
            build_image(self.image, self.files)
        try:
            reg = self._stack.enter_context(running_registry(self.work / "registry"))
            self.src = f"docker://{reg.host}/bench/img:v1"
            skopeo_copy(f"oci:{self.image}:v1", self.src)
            self.store = self.work / "store"
            _run(
                [
                    LAYER,
                    "pull",
                    "-q",
                    "--root",
                    str(self.store),
                    "--name",
                    "base",
                    f"oci:{self.image}:v1",
                ]
            )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _note_rss(self, what: str, rss: int) -> None:
        self.peak_rss[what] = max(self.peak_rss.get(what, 0), rss)

    def rss_summary(self, op: str) -> str:
        """ "peak RSS: layer 48 MB, skopeo 60 MB, umoci 90 MB" for op "pull" or "commit"."""
        parts = [
            f"{what.split(' ', 1)[1]} {rss / 1e6:,.0f} MB"
            for what, rss in self.peak_rss.items()
            if what.startswith(op + " ")
        ]
        return "peak RSS: " + ", ".join(parts) if parts else ""

    def _changes(self, root: Path) -> None:
        if self.debian:
            _install_debs(self.image.parent / "debs", root)
        else:
            _touch(root, self.files)

    def pull_round(self) -> dict[str, float]:
        """Cold pull into an empty store, and copy + unpack into an empty dir."""
        r = self._next()
        store, oci, bundle = self.work / f"s{r}", self.work / f"o{r}", self.work / f"b{r}"
        took: dict[str, float] = {}
        try:
            for who in ("layer", "skopeo+umoci") if r % 2 else ("skopeo+umoci", "layer"):
                if who == "layer":
                    took[who], rss = _timed([LAYER, "pull", "-q", "--root", str(store), self.src])
                    self._note_rss("pull layer", rss)
                    continue
                copy, rss = _timed(
                    [
                        "skopeo",
                        "--insecure-policy",
                        "copy",
                        "--src-tls-verify=false",
                        "-q",
                        self.src,
                        f"oci:{oci}:v1",
                    ]
                )
                self._note_rss("pull skopeo", rss)
                # no sync between the two: skopeo's blob is written back while umoci runs,
                # as ours is while we unpack (we fsync it, too)
                unpack, rss = _timed(
                    ["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)], sync=False
                )
                self._note_rss("pull umoci", rss)
                took[who] = copy + unpack
        finally:
            for d in (store, oci, bundle):
                shutil.rmtree(d, ignore_errors=True)
        return {k: took[k] for k in ("layer", "skopeo+umoci")}

    def commit_round(self) -> dict[str, float]:
        """The same changes made in a mount (ours) and in an unpacked bundle (umoci), then
        timed: `layer commit` and `umoci repack` (in alternating order)."""
        r = self._next()
        mnt = self.work / f"mnt{r}"
        mnt.mkdir()
        _run([LAYER, "mount", "--root", str(self.store), "base", str(mnt), "--name", f"c{r}"])
        try:
            self._changes(mnt)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        layout, bundle = self.work / f"o{r}", self.work / f"b{r}"
        took: dict[str, float] = {}
        try:
            shutil.copytree(self.image, layout)
            _run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
            self._changes(bundle / "rootfs")
            for who in ("layer", "umoci") if r % 2 else ("umoci", "layer"):
                if who == "layer":
                    cmd = [LAYER, "commit", "--root", str(self.store), f"c{r}", f"new:{r}"]
                else:
                    cmd = ["umoci", "repack", "--image", f"{layout}:new", str(bundle)]
                took[who], rss = _timed(cmd)
                self._note_rss(f"commit {who}", rss)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.rmtree(layout, ignore_errors=True)
            _run([LAYER, "rm", "--root", str(self.store), f"c{r}"])
        return {k: took[k] for k in ("layer", "umoci")}

    def unpack_round(self) -> dict[str, float]:
        """Unpack the image's layer blobs from the store twice, without and with fingerprints
        (in alternating order from round to round); the trees are removed again."""
        from imagestore import unpack
        from imagestore.pull import image_layers
        from imagestore.store import Store

        store = Store.open(self.store)
        image_layers(store, "base")  # the layers are unpacked (and their blobs in the store)
        layers = _layer_blobs(store)
        order = [False, True] if self._next() % 2 else [True, False]
        took = {}
        for with_fp in order:
            t0 = time.perf_counter()
            for blob, media_type, diff_id in layers:
                tmp, _ = unpack.unpack_fresh(store, blob, media_type, diff_id, with_fp)
                unpack.remove_tree(tmp)
            took["with fingerprints" if with_fp else "without"] = time.perf_counter() - t0
        return took

    def fsck_round(self) -> dict[str, float]:
        """`layer fsck` of the whole store (every blob by sha256, every layer file by
        xxh3-128) against reading the same files with cat, page cache warm for both."""
        files = [
            str(p)
            for d in ("blobs", "layers")
            for p in (self.store / d).rglob("*")
            if p.is_file() and not p.is_symlink()
        ]
        self.fsck_bytes = sum(os.lstat(f).st_size for f in files)
        t0 = time.perf_counter()
        subprocess.run(
            ["xargs", "-0", "cat"],
            input="\0".join(files).encode(),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cat = time.perf_counter() - t0
        t0 = time.perf_counter()
        _run([LAYER, "fsck", "-q", "--root", str(self.store)])
        ours = time.perf_counter() - t0
        return {"cat": cat, "layer": ours}

    def _next(self) -> int:
        self.rounds += 1
        return self.rounds


def _layer_blobs(store: Any) -> list[tuple[Any, str, Any]]:
    """(blob, media type, DiffID) of each layer of the image `base`."""
    from imagestore import media

    desc = store.resolve("base")
    data = store.read_blob(desc.digest)
    m = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
    ids = media.diff_ids(store.read_blob(m.config.digest))
    return [(x.digest, x.media_type, d) for x, d in zip(m.layers, ids, strict=True)]

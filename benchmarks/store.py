"""Store workloads: `layer pull` versus `skopeo copy` + `umoci unpack`, and `layer commit`
versus `umoci repack`, on the same image served by a real docker-registry on 127.0.0.1.

`StoreBench` owns the registry, the source image (3 gzip layers, N files, built once and cached)
and a store holding it; each `*_round` call times one of ours and one of theirs back to back and
leaves nothing behind.  Single-threaded; root only (umoci unpack as root).
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
from benchmarks.registry import running_registry, skopeo_copy
from imagestore.layout_writer import write_oci_image

LAYER = str(Path(sys.executable).parent / "layer")


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


def _touch(root: Path, files: int) -> None:
    """Rewrite about 1,000 of the image's files (a third of them when the image is small)."""
    n = min(files, 3000)
    for i in range(0, n, max(1, n // 1000)):
        p = root / f"usr/share/l{i % 3}/d{(i // 3) % 50}/f{i // 3}"
        if p.exists():
            p.write_bytes(b"changed %d\n" % i)


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class StoreBench(contextlib.AbstractContextManager["StoreBench"]):
    def __init__(self, files: int, base: Path = CACHE) -> None:
        self.files = files
        self.image = base / f"image-{files}"
        self._stack = contextlib.ExitStack()
        base.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="store-", dir=base))
        self._stack.callback(shutil.rmtree, self.work, True)
        self.rounds = 0

    def __enter__(self) -> StoreBench:
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

    def pull_round(self) -> dict[str, float]:
        """Cold pull into an empty store, then copy + unpack into an empty dir."""
        r = self._next()
        store, oci, bundle = self.work / f"s{r}", self.work / f"o{r}", self.work / f"b{r}"
        try:
            t0 = time.perf_counter()
            _run([LAYER, "pull", "-q", "--root", str(store), self.src])
            ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            _run(
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
            _run(["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)])
            theirs = time.perf_counter() - t0
        finally:
            for d in (store, oci, bundle):
                shutil.rmtree(d, ignore_errors=True)
        return {"layer": ours, "skopeo+umoci": theirs}

    def commit_round(self) -> dict[str, float]:
        """The same ~1,000 files rewritten in a mount (ours) and in an unpacked bundle (umoci),
        then timed: `layer commit` and `umoci repack`."""
        r = self._next()
        mnt = self.work / f"mnt{r}"
        mnt.mkdir()
        _run([LAYER, "mount", "--root", str(self.store), "base", str(mnt), "--name", f"c{r}"])
        try:
            _touch(mnt, self.files)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        t0 = time.perf_counter()
        _run([LAYER, "commit", "--root", str(self.store), f"c{r}", f"new:{r}"])
        ours = time.perf_counter() - t0
        _run([LAYER, "rm", "--root", str(self.store), f"c{r}"])
        layout, bundle = self.work / f"o{r}", self.work / f"b{r}"
        try:
            shutil.copytree(self.image, layout)
            _run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
            _touch(bundle / "rootfs", self.files)
            t0 = time.perf_counter()
            _run(["umoci", "repack", "--image", f"{layout}:new", str(bundle)])
            theirs = time.perf_counter() - t0
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.rmtree(layout, ignore_errors=True)
        return {"layer": ours, "umoci": theirs}

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

"""The benchmark dataset: built once, deterministically, cached under /var/tmp/layer-bench.

Three lower layers in overlay format (char 0/0 whiteouts, `trusted.overlay.opaque`), which
kernel overlayfs, fuse-overlayfs and layerfs all read, so every engine mounts the very same
directories:
  l0  a rootfs-like layer: ~15,000 files in a Debian-like tree (usr/bin, usr/lib, usr/share/doc,
      man, locale, var/lib/dpkg/info, etc ...), sizes drawn from a log-normal distribution
      (median ~2 KiB, a long tail up to a few MiB, ~110 MB in all), 5 % symlinks; plus
      big/file (1 GiB), small/ (10,000 × 4 KiB), rmrf/ (a directory of 2,000 entries);
  l1  1,000 new files, 500 files replaced, 300 whiteouts, 2 opaque directories;
  l2  500 new files, 200 replaced, 200 whiteouts, 1 opaque directory, 1 whole directory whited out.
Also a 100 MB tarball (W9) and a stack of 500 tiny layers (mount time).  `quick` builds the
same shapes about ten times smaller.  Contents come from a seeded generator, so two builds are
byte-identical; a version stamp makes a changed generator rebuild.  Single process; building
the full set takes about a minute (mostly the 1 GiB file).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from unionfs import markers

VERSION = 5
CACHE = Path("/var/tmp/layer-bench")
MTIME = 1_700_000_000


@dataclass(frozen=True)
class Sizes:
    """How big each part of the dataset is."""

    rootfs_files: int
    big_bytes: int
    small_files: int
    rmrf_entries: int
    copyup_files: int
    tar_bytes: int
    create_files: int
    write_bytes: int
    random_read_bytes: int
    stack_depths: tuple[int, ...]
    pull_files: int


FULL = Sizes(
    16_500,  # ~15,000 files and symlinks once duplicate names are dropped
    1 << 30,
    10_000,
    2_000,
    1_000,
    100 << 20,
    10_000,
    1 << 30,
    64 << 20,
    (1, 10, 100, 500),
    3_000,
)
QUICK = Sizes(
    1_500, 64 << 20, 1_000, 200, 100, 10 << 20, 1_000, 64 << 20, 16 << 20, (1, 10, 100, 500), 300
)


@dataclass(frozen=True)
class Dataset:
    root: Path
    sizes: Sizes

    @property
    def lowers(self) -> list[Path]:
        """Lower layers, top first (the order of `lowerdir=`)."""
        return [self.root / "l2", self.root / "l1", self.root / "l0"]

    @property
    def big(self) -> str:
        return "big/file"

    @property
    def tarball(self) -> Path:
        return self.root / "w9.tar"

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    def manifest(self) -> dict[str, list[str]]:
        return json.loads((self.root / "manifest.json").read_text())


def dataset(quick: bool, base: Path = CACHE) -> Dataset:
    """The cached dataset, built first if missing or built by an older generator."""
    sizes = QUICK if quick else FULL
    root = base / ("data-quick" if quick else "data")
    ds = Dataset(root, sizes)
    stamp = root / "done"
    if stamp.exists() and stamp.read_text() == str(VERSION):
        return ds
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(Dataset(tmp, sizes))
    tmp.rename(root)
    stamp.write_text(str(VERSION))
    return ds


# --- generation --------------------------------------------------------------------------

_DIRS = [  # (directory pattern, share of the files, file name pattern)
    ("usr/bin", 0.04, "{w}"),
    ("usr/sbin", 0.01, "{w}"),
    ("usr/lib/x86_64-linux-gnu", 0.10, "lib{w}.so.{n}"),
    ("usr/lib/python3/dist-packages/{p}", 0.14, "{w}.py"),
    ("usr/share/doc/{p}", 0.12, "{w}"),
    ("usr/share/man/man{m}", 0.08, "{w}.{m}.gz"),
    ("usr/share/locale/{l}/LC_MESSAGES", 0.10, "{p}.mo"),
    ("usr/share/zoneinfo/{z}", 0.05, "{w}"),
    ("usr/share/perl5/{P}", 0.06, "{w}.pm"),
    ("usr/include/{p}", 0.06, "{w}.h"),
    ("var/lib/dpkg/info", 0.16, "{p}.{e}"),
    ("etc/{p}", 0.08, "{w}.conf"),
]
_SYLL = [
    "ab",
    "cor",
    "de",
    "fen",
    "gil",
    "ho",
    "ix",
    "ja",
    "ku",
    "lo",
    "mon",
    "ne",
    "or",
    "pa",
    "qu",
    "ri",
    "sa",
    "tu",
    "ul",
    "ve",
    "wy",
    "xe",
    "yo",
    "zu",
]
_LANGS = [
    "de",
    "fr",
    "es",
    "it",
    "ja",
    "pt_BR",
    "ru",
    "zh_CN",
    "nl",
    "sv",
    "pl",
    "cs",
    "da",
    "fi",
    "hu",
    "ko",
    "nb",
    "ro",
    "sk",
    "tr",
    "uk",
    "vi",
]


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.blob = self.rnd.randbytes(16 << 20)

    def word(self) -> str:
        return "".join(self.rnd.choice(_SYLL) for _ in range(self.rnd.randint(2, 4)))

    def size(self) -> int:
        # log-normal: median 2 KiB, mean ~7 KiB, capped at 8 MiB
        return min(int(math.exp(self.rnd.gauss(math.log(2048), 1.6))), 8 << 20)

    def data(self, size: int) -> bytes:
        if size <= len(self.blob):
            off = self.rnd.randrange(0, len(self.blob) - size + 1)
            return self.blob[off : off + size]
        return (self.blob * (size // len(self.blob) + 1))[:size]

    def write(self, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data(size))
        os.utime(path, (MTIME, MTIME))


def _rootfs(g: _Gen, root: Path, files: int) -> list[str]:
    """A Debian-like tree of `files` entries; returns the regular files' relative paths."""
    pkgs = [g.word() for _ in range(max(20, files // 25))]
    made: list[str] = []
    links = 0
    for pattern, share, name in _DIRS:
        for _ in range(int(files * share)):
            fields = {
                "w": g.word(),
                "n": g.rnd.randint(0, 9),
                "m": g.rnd.randint(1, 8),
                "p": g.rnd.choice(pkgs),
                "l": g.rnd.choice(_LANGS),
                "z": g.word().title(),
                "P": g.word().title(),
                "e": g.rnd.choice(["list", "md5sums", "postinst"]),
            }
            rel = f"{pattern.format(**fields)}/{name.format(**fields)}"
            p = root / rel
            if p.exists() or p.is_symlink():
                continue
            if made and g.rnd.random() < 0.05:
                p.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(root / g.rnd.choice(made), p.parent), p)
                links += 1
                continue
            g.write(p, g.size())
            made.append(rel)
    return made


def _build(ds: Dataset) -> None:
    s = ds.sizes
    g = _Gen(20261127)
    l0, l1, l2 = ds.root / "l0", ds.root / "l1", ds.root / "l2"
    files = _rootfs(g, l0, s.rootfs_files)

    big = l0 / "big" / "file"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        for _ in range(s.big_bytes // len(g.blob)):
            f.write(g.blob)
        f.write(g.blob[: s.big_bytes % len(g.blob)])
    for i in range(s.small_files):
        g.write(l0 / "small" / f"f{i:05d}", 4096)
    per_dir = max(1, s.rmrf_entries // 40 - 1)
    n = 0
    for d in range(40):
        (l0 / "rmrf" / f"d{d:02d}").mkdir(parents=True)
        n += 1
        for i in range(per_dir):
            if n >= s.rmrf_entries:
                break
            g.write(l0 / "rmrf" / f"d{d:02d}" / f"f{i:03d}", g.size() % 16384)
            n += 1

    # W7 appends to these; they are never whited out or replaced by the upper layers
    pool = sorted(files)
    g.rnd.shuffle(pool)
    copyup, rest = sorted(pool[: s.copyup_files]), pool[s.copyup_files :]
    # whole directories whited out or made opaque must not hide a W7 file
    keep = {str(Path(r).parent) for r in copyup}

    def upper_layer(
        layer: Path,
        tag: str,
        new: int,
        replaced: int,
        whiteouts: int,
        opaque: int,
        dir_whiteout: bool,
    ) -> None:
        for i in range(new):
            g.write(layer / "usr/local" / tag / f"d{i % 50:02d}" / f"n{i:05d}", g.size())
        for rel in g.rnd.sample(rest, replaced):
            g.write(layer / rel, g.size())
        dirs = sorted(
            {str(Path(r).parent) for r in rest if r.startswith("usr/share/locale/")} - keep
        )
        opaque_dirs = g.rnd.sample(dirs, min(opaque, len(dirs)))
        for rel in opaque_dirs:
            d = layer / rel
            d.mkdir(parents=True, exist_ok=True)
            markers.set_opaque(os.fsencode(d))  # as root (the harness is): trusted.overlay
            for i in range(5):
                g.write(d / f"{tag}-{i}.mo", g.size())
        for rel in g.rnd.sample(rest, whiteouts):
            p = layer / rel
            # kept: a replacement made above; no whiteout inside this layer's own opaque
            # directories (pointless there, and the kernel lists such a whiteout)
            if p.exists() or str(Path(rel).parent) in opaque_dirs:
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            markers.make_whiteout(os.fsencode(p))
        if dir_whiteout:
            doc = sorted(
                {str(Path(r).parent) for r in rest if r.startswith("usr/share/doc/")} - keep
            )
            p = layer / g.rnd.choice(doc)
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                markers.make_whiteout(os.fsencode(p))

    upper_layer(
        l1, "l1", s.rootfs_files // 15, s.rootfs_files // 30, s.rootfs_files // 50, 2, False
    )
    upper_layer(l2, "l2", s.rootfs_files // 30, s.rootfs_files // 75, s.rootfs_files // 75, 1, True)

    with tarfile.open(ds.tarball, "w", format=tarfile.PAX_FORMAT) as tf:
        total = 0
        i = 0
        while total < s.tar_bytes:
            size = min(g.size() * 8, s.tar_bytes - total)
            info = tarfile.TarInfo(f"untarred/pkg{i % 40:02d}/sub{i % 7}/file{i:05d}")
            info.size, info.mtime, info.mode = size, MTIME, 0o644
            tf.addfile(info, io.BytesIO(g.data(size)))
            total += size
            i += 1

    for depth in range(max(s.stack_depths)):
        layer_dir = ds.stack / f"{depth:03d}"
        (layer_dir / "shared").mkdir(parents=True)
        g.write(layer_dir / f"own{depth}", 64)
        g.write(layer_dir / "shared" / f"s{depth}", 64)

    (ds.root / "manifest.json").write_text(json.dumps({"copyup": copyup}, indent=0))

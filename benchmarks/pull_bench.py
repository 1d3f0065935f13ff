"""Pull + unpack from a local registry: `layer pull` versus `skopeo copy` to an OCI dir followed
by `umoci unpack` (the usual way to get a rootfs without a daemon).

    python -m benchmarks.pull_bench [--files N] [--rounds R]

Builds (cached) an image of 3 gzip layers with N files in all (~8 MB of data), starts a real
docker-registry on 127.0.0.1, pushes the image with skopeo, then times, alternating the two,
a cold pull into an empty store (layer) and a copy + unpack into an empty dir (skopeo+umoci).
Prints medians and the median of pair-by-pair ratios.  Root only (umoci unpack as root).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import ms, pair_ratio
from imagestore.layout_writer import write_oci_image

CACHE = Path("/var/tmp/layer-bench/pull")
LAYER = str(Path(sys.executable).parent / "layer")


def build_image(root: Path, files: int) -> None:
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
    write_oci_image(root, tars, "v1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.registry_util import running_registry, skopeo_copy

    image = CACHE / f"image-{args.files}"
    build_image(image, args.files)
    work = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    ours, theirs = [], []
    try:
        with running_registry(work / "registry") as reg:
            src = f"docker://{reg.host}/bench/img:v1"
            skopeo_copy(f"oci:{image}:v1", src)
            for r in range(args.rounds):
                store, oci, bundle = work / f"s{r}", work / f"o{r}", work / f"b{r}"
                t0 = time.perf_counter()
                subprocess.run(
                    [LAYER, "pull", "-q", "--root", str(store), src],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                subprocess.run(
                    [
                        "skopeo",
                        "--insecure-policy",
                        "copy",
                        "--src-tls-verify=false",
                        "-q",
                        src,
                        f"oci:{oci}:v1",
                    ],
                    check=True,
                )
                subprocess.run(
                    ["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)],
                    check=True,
                    capture_output=True,
                )
                theirs.append(time.perf_counter() - t0)
                for d in (store, oci, bundle):
                    shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in (image / "blobs" / "sha256").iterdir())
    print(
        f"image: 3 gzip layers, {args.files} files, {size / 1e6:.1f} MB compressed; "
        f"{args.rounds} rounds"
    )
    print(f"  layer pull             {ms(ours)}")
    print(f"  skopeo copy + umoci    {ms(theirs)}")
    print(f"  ratio (layer / skopeo+umoci), median of pairs: x{pair_ratio(ours, theirs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

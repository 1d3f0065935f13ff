"""Podman paths (rows S3-S5): the same podman commands on each storage engine.

  S3  `podman run --rm --network none IMG true`   (mount, start, stop, unmount)
  S4  a small `podman build --no-cache`: 3 RUN steps and a COPY on the busybox image
  S5  `podman export` of a container of the store benchmark's image (3 layers, N files)

`PodmanBench` owns one private podman per engine (podman_env.Podman: kernel overlay, or
layerfs / fuse-overlayfs as mount_program), loads both images into each once, and each
`*_round` times one command per engine back to back, leaving nothing behind.  Root only;
single-threaded; the reaper collects the orphans podman leaves (conmon, mount daemons).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.podman_env import Podman, Reaper, missing_tools, write_busybox_layout
from benchmarks.store import build_image

IMAGE = "localhost/bb:base"
BIG = "localhost/files:v1"
NET = ("--network", "none")
BUILD = """FROM localhost/bb:base
RUN mkdir -p /app && for i in 1 2 3 4 5 6 7 8; do echo $i > /app/f$i; done
COPY payload /app/payload
RUN cat /app/payload > /app/copy && rm /app/f1 && mv /app/f2 /app/g2
RUN ln /app/copy /app/link && chmod 600 /app/copy
"""


class PodmanBench:
    def __init__(self, engines: list[str], files: int, base: Path) -> None:
        self.engines = engines
        self.files = files
        self.base = base
        self._stack = contextlib.ExitStack()
        self.podmans: dict[str, Podman] = {}
        self._n = 0

    def __enter__(self) -> PodmanBench:
        missing = missing_tools(tuple(self.engines))
        if missing:
            raise RuntimeError(f"missing: {', '.join(missing)} (scripts/setup.sh installs them)")
        self.root = Path(tempfile.mkdtemp(prefix="podman-", dir=self.base))
        self._stack.callback(shutil.rmtree, self.root, True)
        self._stack.enter_context(Reaper())
        layout = write_busybox_layout(self.root / "bb-layout")
        big = self.base / f"store-image-{self.files}"
        build_image(big, self.files)
        self.ctx = self.root / "ctx"
        self.ctx.mkdir()
        (self.ctx / "Containerfile").write_text(BUILD)
        (self.ctx / "payload").write_bytes(bytes(range(256)) * 256)
        for engine in self.engines:
            p = Podman(self.root / engine, engine)
            self._stack.callback(p.reset)
            p.load_image(layout, "base", IMAGE)
            p.load_image(big, "v1", BIG)
            p.run("create", *NET, "--name", "big", BIG, "true")
            self.podmans[engine] = p
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _each(self, fn: object) -> dict[str, float]:
        out: dict[str, float] = {}
        for engine, p in self.podmans.items():
            t0 = time.perf_counter()
            fn(p)  # type: ignore[operator]
            out[engine] = time.perf_counter() - t0
        return out

    def run_round(self) -> dict[str, float]:
        return self._each(lambda p: p.run("run", "--rm", *NET, IMAGE, "true"))

    def build_round(self) -> dict[str, float]:
        self._n += 1
        tag = f"localhost/bench:{self._n}"
        took = self._each(
            lambda p: p.run("build", "-q", "--no-cache", *NET, "-t", tag, str(self.ctx))
        )
        for p in self.podmans.values():
            p.run("rmi", "-f", tag, check=False)
        return took

    def export_round(self) -> dict[str, float]:
        out = self.root / "export.tar"

        def export(p: Podman) -> None:
            p.run("export", "-o", str(out), "big")

        took = self._each(export)
        out.unlink(missing_ok=True)
        return took

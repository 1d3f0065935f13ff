"""Real podman on layerfs (mount_program) against podman on kernel overlay (issue 13).

Two private podman storages (benchmarks/podman_env.py: own storage.conf and containers.conf,
graphroot under the test's temp dir, cgroupfs, file events, --network none, runc) get the same
locally built busybox image: a whiteout, an opaque directory, a hard-link trio, a file owned
by 1000.  Every scenario runs on both, and its results — command output, `podman diff`, and
file lists (type, mode, owner, size, digest, link group) of `podman export` and of the layers
of `podman save` — must be identical.  mount_program is the layerfs of the venv running the
tests.  Root only; deselect with `-m "not podman"`.

The kernel storage diffs the way every mount_program storage does: containers/storage always
computes `podman diff` and commit layers of a mount_program storage by comparing the lower
and merged trees ("naive diff", overlay.go useNaiveDiff), while on kernel overlay it reads
the upper directly; the two disagree by design (e.g. a lower file copied up only to be hard
linked is "changed" for one and not for the other), for fuse-overlayfs as for layerfs.  So the
oracle storage is told to use the naive diff too; everything else is plain kernel overlay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.podman_env import (
    Podman,
    Reaper,
    missing_tools,
    tar_listing,
    write_busybox_layout,
)
from tests.mounts import is_mounted, need, require_fuse, require_root

pytestmark = [pytest.mark.podman, pytest.mark.mount]

ENGINES = ("layerfs", "kernel")
IMAGE = "localhost/bb:base"
NET = ("--network", "none")
# files podman writes into every container itself (its id, its hosts): not the image's
VOLATILE_PATHS = ("etc/hostname", "etc/hosts", "etc/resolv.conf", "run/", "dev/", "proc/",
                  "sys/", "etc/mtab")  # fmt: skip
EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("ruid=%d euid=%d\n", (int)getuid(), (int)geteuid()); return 0; }
"""


@pytest.fixture(scope="module")
def podmans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Podman]]:
    require_root()
    require_fuse()
    missing = missing_tools(ENGINES)
    need(not missing, f"missing: {', '.join(missing)} (scripts/setup.sh installs them)")
    base = tmp_path_factory.mktemp("podman")
    layout = write_busybox_layout(base / "layout")
    with Reaper():
        envs = {engine: Podman(base / engine, engine, naive_diff=True) for engine in ENGINES}
        try:
            for p in envs.values():
                p.load_image(layout, "base", IMAGE)
            yield envs
        finally:
            for p in envs.values():
                p.reset()
    left = [line for line in Path("/proc/mounts").read_text().splitlines() if str(base) in line]
    assert not left, f"podman left mounts behind: {left}"


def both(podmans: dict[str, Podman], scenario: Callable[[Podman], Any]) -> Any:
    """Run `scenario` on every engine; its results must be equal.  Returns them."""
    results = {engine: scenario(p) for engine, p in podmans.items()}
    first = results[ENGINES[-1]]  # the kernel's: the oracle
    for engine, got in results.items():
        assert got == first, f"{engine} differs from the kernel:\n{_diff(got, first)}"
    return first


def _diff(got: Any, want: Any) -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        return "\n".join(
            f"{k}: {got.get(k)!r} != {want.get(k)!r}"
            for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)
        )
    return f"{got!r}\n!=\n{want!r}"


def export_listing(p: Podman, container: str) -> list[tuple[str, ...]]:
    return tar_listing(p.run("export", container).stdout, skip=VOLATILE_PATHS)


def saved_layers(p: Podman, image: str, tmp: Path) -> list[list[tuple[str, ...]]]:
    """The file list of every layer of `image`, from `podman save` (docker-archive)."""
    out = tmp / f"{p.engine}-save.tar"
    out.unlink(missing_ok=True)
    p.run("save", "-q", "-o", str(out), image)
    with tarfile.open(out) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = []
        for name in manifest[0]["Layers"]:
            data = tf.extractfile(name).read()  # type: ignore[union-attr]
            layers.append(tar_listing(data, skip=VOLATILE_PATHS))
    out.unlink()
    return layers


def _sh(p: Podman, *args: str) -> str:
    return p.out(*args)


# ----- scenarios ----------------------------------------------------------------------------
MODIFY = (
    "set -e; "
    "echo appended >> /data/edit; rm /data/keep; echo new > /data/new; mkdir -p /newdir/sub; "
    "echo deep > /newdir/sub/f; ln /links/h1 /links/h4; rm /links/h2; rm /opq/new; "
    "echo again > /opq/again; chmod 600 /etc/motd; mv /data/owned /data/moved; "
    "touch /etc/gone.conf; mkdir /opq/sub; echo x > /opq/sub/old2"
)
SHOW = (
    "cat /data/edit /data/new; ls /data /links /opq /opq/sub /etc; "
    "stat -c '%h %a %u:%g %n' /links/* /etc/motd /data/moved"
)


def test_run_modify_restart_diff_commit(podmans, tmp_path):
    def scenario(p: Podman) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["first"] = _sh(p, "run", *NET, "--name", "c1", IMAGE, "sh", "-c",
                           f"test -f /data/new || ({MODIFY}); {SHOW}")  # fmt: skip
        out["restart"] = _sh(p, "start", "-a", "c1")  # the upper is mounted again
        out["diff"] = sorted(_sh(p, "diff", "c1").splitlines())
        out["export"] = export_listing(p, "c1")
        p.run("commit", "-q", "c1", "localhost/c1:commit")
        out["commit_run"] = _sh(p, "run", "--rm", *NET, "localhost/c1:commit", "sh", "-c", SHOW)
        out["layers"] = saved_layers(p, "localhost/c1:commit", tmp_path)
        p.remove("c1")
        p.run("rmi", "localhost/c1:commit")
        return out

    got = both(podmans, scenario)
    assert got["first"] == got["restart"]  # the second start changes nothing, shows the same
    # the commit's content (naive diff: a copy-up made only for `ln` is not "changed", so the
    # commit keeps h1 in the lower with its old links: the names differ, not the data)
    assert got["commit_run"].split("/links:")[0] == got["first"].split("/links:")[0]
    assert "appended" in got["first"] and "1 644 0:0 /links/h2" not in got["first"]
    assert (
        "C /data" in got["diff"] and "D /data/keep" in got["diff"] and "A /data/new" in got["diff"]
    )
    assert len(got["layers"]) == 3  # base, top, the commit


BUILD = """FROM localhost/bb:base
RUN mkdir -p /app/d && echo one > /app/d/one && echo two > /app/two && ln /app/two /app/two-link
RUN echo more >> /app/d/one && rm /etc/motd && mv /app/two /app/renamed && rm -rf /opq/new
RUN ln /links/h1 /app/h-from-lower && mv /app/d /app/moved-dir && echo 3 > /app/moved-dir/three \
    && rm /links/h3 && echo changed > /data/edit
COPY euid /bin/euid
RUN chmod 4755 /bin/euid && rm -rf /opq && mkdir /opq && echo re > /opq/re
"""


@pytest.fixture(scope="module")
def built(podmans, tmp_path_factory) -> str:
    """A multi-step `podman build` on both engines, with a static setuid binary in it."""
    ctx = tmp_path_factory.mktemp("build")
    need(shutil.which("gcc") is not None, "gcc is missing (a static setuid test binary)")
    (ctx / "euid.c").write_text(EUID_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(ctx / "euid"), str(ctx / "euid.c")],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    (ctx / "euid.c").unlink()
    (ctx / "Containerfile").write_text(BUILD)
    for p in podmans.values():
        p.run("build", "-q", *NET, "--layers", "-t", "localhost/built:1", str(ctx))
    return "localhost/built:1"


def test_build_multistep_layers_agree(podmans, built, tmp_path):
    def scenario(p: Podman) -> dict[str, Any]:
        p.run("create", *NET, "--name", "b1", built, "true")
        out = {"layers": saved_layers(p, built, tmp_path), "export": export_listing(p, "b1")}
        p.remove("b1")
        return out

    got = both(podmans, scenario)
    assert len(got["layers"]) >= 6  # base + top + one per RUN/COPY step
    names = {row[0]: row for row in got["export"]}
    assert "etc/motd" not in names and "app/two" not in names and "opq/new" not in names
    assert names["app/renamed"][5] == names["app/two-link"][5]  # same data
    assert names["app/moved-dir/one"][5] != "" and "app/d" not in names
    assert names["bin/euid"][2] == "104755"


def test_setuid_binary_elevates_as_user_1000(podmans, built):
    out = both(podmans, lambda p: _sh(p, "run", "--rm", *NET, "--user", "1000", built, "/bin/euid"))
    assert out.strip() == "ruid=1000 euid=0"


def test_mount_and_unmount(podmans):
    def scenario(p: Podman) -> dict[str, Any]:
        p.run("create", *NET, "--name", "m1", IMAGE, "true")
        where = _sh(p, "mount", "m1").strip()
        assert is_mounted(where), where
        fstype = next(line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
                      if line.split()[1] == where)  # fmt: skip
        assert fstype == ("fuse.layerfs" if p.engine == "layerfs" else "overlay"), fstype
        seen = sorted(os.listdir(where))
        Path(where, "data", "via-mount").write_text("written through podman mount\n")
        os.unlink(Path(where, "links", "h3"))
        p.run("unmount", "m1")
        assert not is_mounted(where)
        out = {
            "seen": seen,
            "export": export_listing(p, "m1"),
            "diff": sorted(_sh(p, "diff", "m1").splitlines()),
        }
        p.remove("m1")
        return out

    got = both(podmans, scenario)
    assert "data/via-mount" in {row[0] for row in got["export"]}


def test_uidmap_container(podmans):
    script = (
        "id; stat -c '%u:%g %n' /data/owned /etc/motd /bin/busybox; echo x > /tmp/new; "
        "chown 1000:1000 /tmp/new; stat -c '%u:%g %n' /tmp/new; cat /proc/self/uid_map"
    )

    def scenario(p: Podman) -> dict[str, Any]:
        out = _sh(p, "run", *NET, "--name", "u1", "--uidmap", "0:100000:65536",
                  "--gidmap", "0:100000:65536", IMAGE, "sh", "-c", script)  # fmt: skip
        result = {"out": out, "export": export_listing(p, "u1")}
        p.remove("u1")
        return result

    got = both(podmans, scenario)
    assert "1000:1000 /data/owned" in got["out"] and "0:0 /etc/motd" in got["out"]
    assert "1000:1000 /tmp/new" in got["out"] and "100000" in got["out"]


def test_no_zombies_left(podmans):
    """Every orphan podman left (conmon, the mount program's daemons) has been reaped."""
    Reaper.reap()
    me = str(os.getpid())
    zombies = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            if f"PPid:\t{me}\n" in status and "State:\tZ" in status:
                zombies.append(entry.name)
    assert not zombies

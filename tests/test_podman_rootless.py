"""Rootless podman with `mount_program = layerfs`: the mount program runs as uid 0 of
podman's user namespace, where trusted.* xattrs are refused (tests/test_userns.py).

As user nobody with no subordinate ids (podman maps the one id it has), over a private
storage: a container changes files of the image (a copy-up, a whiteout, an opaque directory
made over a removed one), moves a lower directory away and makes a new one at its name; then
`podman diff` and a commit, whose layer podman computes through a fresh mount of the
container (its "naive diff"), and a run of the committed image.  The expected results are
written out: on this machine the same run with fuse-overlayfs, and with podman 4.3's own
rootless kernel overlay, commits a new `/data` that still holds the moved one's files
(README).
Before session 39 layerfs refused the move and the new directory with EPERM here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.podman_env import LAYERFS, Reaper, missing_tools, write_busybox_layout
from tests.mounts import need, require_fuse

pytestmark = [pytest.mark.podman, pytest.mark.mount]

NOBODY = 65534
TIMEOUT = 120


class Rootless:
    """podman as user nobody over `root` (storage, runtime dir, home)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("graph", "run", "tmp", "home"):
            (root / sub).mkdir(parents=True)
        (root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{root / "graph"}"\n'
            f'runroot = "{root / "run"}"\n'
            "[storage.options.overlay]\n"
            f'mount_program = "{LAYERFS}"\n'
        )
        (root / "containers.conf").write_text(
            "[containers]\n"
            'netns = "none"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root / "events.log"}"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{root / "tmp"}"\n'
        )
        for p in [root, *root.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(root / "home"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "TMPDIR": str(root / "tmp"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_CONF": str(root / "containers.conf"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "podman"]
        return subprocess.run(
            [*cmd, *args], env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=TIMEOUT,
        )  # fmt: skip

    def out(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr[-2000:]}"
        return r.stdout

    def close(self) -> None:
        """Remove what podman made, then end its user namespace's processes: the pause
        process that holds it, and any mount program left serving there."""
        self.run("rm", "-a", "-f", "-t", "0")
        self.run("system", "reset", "-f")
        for pidfile in self.root.rglob("pause.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["pkill", "-KILL", "-f", str(self.root)], capture_output=True)


@pytest.fixture
def podman() -> Iterator[Rootless]:
    need(os.geteuid() == 0, "needs root to switch to an unprivileged user")
    require_fuse()
    missing = missing_tools(("layerfs",))
    need(not missing, f"missing: {', '.join(missing)}")
    for tool in ("setpriv", "pkill"):
        need(shutil.which(tool) is not None, f"{tool} is missing")
    need(os.stat("/dev/fuse").st_mode & 0o006 == 0o006, "/dev/fuse is not open to users here")
    # podman commit reads the image's config through a temp file in /var/tmp, whatever
    # TMPDIR or containers.conf say (containers/image's directory for big files)
    need(os.stat("/var/tmp").st_mode & 0o1777 == 0o1777, "/var/tmp is not mode 1777 here")
    base = Path(tempfile.mkdtemp(prefix="layer-rootless-", dir="/tmp"))
    os.chmod(base, 0o755)
    p = Rootless(base / "podman")
    # podman's pause process, conmon and the daemonized mount programs are orphans by
    # design: reparented to this process while the test runs, and reaped here
    with Reaper() as reaper:
        try:
            info = p.run("info")
            need(info.returncode == 0, f"rootless podman does not run here: {info.stderr[-500:]}")
            yield p
        finally:
            p.close()
            time.sleep(0.2)  # the killed processes' children exit too
            reaper.reap()
            shutil.rmtree(base, ignore_errors=True)


def test_rootless_podman_with_layerfs(podman):
    layout = write_busybox_layout(podman.root.parent / "layout", one_owner=True)
    for p in [layout, *layout.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    # podman names an image pulled from an oci: layout after its path, which must parse as a
    # reference (a temp dir with "_" or a capital letter does not): pulled through a link
    alias = Path(f"/tmp/layer-rootless-oci-{os.getpid()}")
    alias.unlink(missing_ok=True)
    alias.symlink_to(layout)
    try:
        image = podman.out("pull", "-q", f"oci:{alias}:base").split()[-1]
    finally:
        alias.unlink()
    first = podman.out(
        "run", "--rm", image, "sh", "-c",
        "id -u; echo more >> /data/edit; cat /data/edit; rm /etc/motd; ls /etc;"
        " rm -rf /opq; mkdir /opq; ls -a /opq",
    )  # fmt: skip
    assert first.split("\n") == [
        "0", "lower line", "more", "group", "hostname", "hosts", "mtab", "passwd",
        ".", "..", "",
    ], first  # fmt: skip
    podman.out(
        "run", "--name", "c1", image, "sh", "-c",
        "echo x > /new; mv /data /d2; mkdir -p /data/sub; rm -r /links",
    )  # fmt: skip
    diff = sorted(podman.out("diff", "c1").split("\n"))
    for line in ("A /d2", "A /d2/edit", "A /data/sub", "A /new", "D /data/edit", "D /links"):
        assert line in diff, diff
    podman.out("commit", "-q", "c1", "localhost/c1img")
    second = podman.out(
        "run", "--rm", "localhost/c1img", "sh", "-c",
        "cat /new; ls /d2; echo --; ls /data; ls /links 2>&1 || true",
    )  # fmt: skip
    assert second.split("\n") == [
        "x", "edit", "keep", "--", "sub", "ls: /links: No such file or directory", "",
    ], second  # fmt: skip

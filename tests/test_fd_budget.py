"""Issue 12, item 10: one unprivileged user holding many files open through an allow_other
mount does not exhaust the daemon's descriptors: root's opens still work.  The daemon raises
RLIMIT_NOFILE (unionfs.fdlimit) to fs.nr_open as root."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.mounts import LayerfsMount, require_root
from unionfs import fdlimit

pytestmark = pytest.mark.mount

HOLDER = r"""
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = int(sys.argv[2])
fds = [os.open(sys.argv[1], os.O_RDONLY) for _ in range(n)]
print(len(fds), flush=True)
sys.stdin.read()
"""


def can_raise_hard_limit() -> bool:
    """CAP_SYS_RESOURCE (bit 24), without which not even root raises a hard limit."""
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(caps, 16) >> 24 & 1)


def test_raise_nofile_keeps_within_bounds():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        got = fdlimit.raise_nofile()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert got == soft == hard >= before[0]
        if os.geteuid() == 0 and can_raise_hard_limit():
            assert soft >= min(fdlimit.TARGET, fdlimit._nr_open())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_many_open_files_of_another_user_leave_root_able_to_open(tmp_path):
    require_root()
    if not can_raise_hard_limit():
        pytest.skip("no CAP_SYS_RESOURCE here: the daemon cannot raise its hard limit")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_holder = min(hard - 64, 12_000)
    holders_needed = (hard + per_holder) // per_holder + 1  # more than the old daemon's limit
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_text("data")
    (lower / "g").write_text("root's")
    for p in [tmp_path, *tmp_path.parents]:  # let nobody reach the mount
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, 0o755)
    holders: list[subprocess.Popen[str]] = []
    with LayerfsMount(mnt, [lower], upper, work):
        try:
            for _ in range(holders_needed):
                h = subprocess.Popen(
                    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     sys.executable, "-c", HOLDER, str(mnt / "f"), str(per_holder)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                holders.append(h)
                assert h.stdout is not None
                line = h.stdout.readline()
                assert line.strip() == str(per_holder), h.stderr.read() if h.stderr else ""
            with open(mnt / "g") as f:  # root, after the others hold more than 20k
                assert f.read() == "root's"
            (mnt / "new").write_text("written")
            assert (upper / "new").read_text() == "written"
        finally:
            for h in holders:
                h.kill()
                h.communicate(timeout=30)

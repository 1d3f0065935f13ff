"""unionfs/prefetch.py: the helper that lists subdirectories ahead of a tree walk.

What a user must be able to rely on: it lists what it is sent (seen here by inotify's
IN_OPEN of the directories: it reads them with O_NOATIME, so their access times cannot
tell), it never touches a layer the mount shadows, and it
is gone once the mount is: killed and reaped at unmount, never left holding a layer's
filesystem.  `prefetch=0` starts no helper at all."""

from __future__ import annotations

import ctypes
import os
import struct
import time
from pathlib import Path

import pytest

from tests.layerdata import write
from tests.mounts import LayerfsMount
from unionfs import prefetch
from unionfs.fsat import Roots
from unionfs.prefetch import MESSAGE_MAX, START_AFTER, Prefetcher, messages
from unionfs.stack import LayerStack


def _tree(root: Path, dirs: int) -> list[Path]:
    """`dirs` directories under `root`, each with a subdirectory holding a file."""
    subs = []
    for i in range(dirs):
        sub = root / f"d{i}" / "sub"
        write(sub / "f", b"x")
        subs.append(sub)
    return subs


class _Opens:
    """inotify watches for IN_OPEN on `paths` (opened since the watch was added)."""

    IN_OPEN, IN_NONBLOCK = 0x20, os.O_NONBLOCK

    def __init__(self, paths: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.wds = {}
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(p), self.IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.wds[wd] = p
        self.opened: set[Path] = set()

    def seen(self, path: Path, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while path not in self.opened and time.monotonic() < deadline:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            pos = 0
            while pos < len(data):  # struct inotify_event: wd, mask, cookie, len, name
                wd, mask, _, size = struct.unpack_from("iIII", data, pos)
                if mask & self.IN_OPEN and wd in self.wds:
                    self.opened.add(self.wds[wd])
                pos += 16 + size
        return path in self.opened

    def close(self) -> None:
        os.close(self.fd)


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


def _helpers(daemon: int) -> list[int]:
    """The daemon's child processes that run the helper."""
    out = []
    for task in Path(f"/proc/{daemon}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if prefetch.HELPER.encode() in cmdline:
                out.append(int(child))
    return out


def test_messages_are_whole_paths_each_within_one_atomic_write():
    paths = [b"/layer/" + b"n%d" % i * 40 for i in range(300)] + [b"/x" * 3000, b"/last"]
    out = messages(paths)
    assert len(out) > 1 and all(len(m) <= MESSAGE_MAX and m.endswith(b"\0") for m in out)
    sent = b"".join(out).split(b"\0")[:-1]
    assert sent == paths[:300] + [b"/last"]  # in order; the one too long for a message is left out


def test_the_helper_lists_what_it_is_sent_and_is_reaped_at_close(tmp_path):
    lower = tmp_path / "lower"
    subs = _tree(lower, START_AFTER + 1)
    opens = _Opens(subs)
    stack = LayerStack([str(lower)], fs=Roots())
    pre = Prefetcher(stack)
    try:
        names = sorted(os.listdir(lower))
        for name in names[: START_AFTER - 1]:  # fewer listings than START_AFTER: no helper yet
            pre.listed(stack.listing(stack.find(stack.root, name.encode())))
        assert pre.proc is None and pre.listings == START_AFTER - 1
        for name in names[START_AFTER - 1 :]:  # the helper starts, with the waiting paths
            pre.listed(stack.listing(stack.find(stack.root, name.encode())))
        assert pre.proc is not None
        pid = pre.proc.pid
        for sub in subs:
            assert opens.seen(sub), f"{sub} was not listed"
    finally:
        pre.close()
        opens.close()
    assert pre.proc is None and _gone(pid)
    pre.close()  # again: nothing left to do
    pre.listed(stack.listing(stack.root))  # after close (the mount is gone): no new helper
    assert pre.proc is None


def test_a_layer_the_mount_shadows_is_never_sent(tmp_path):
    """A layer root at or under the mountpoint is reached only through the fd fsat.Roots
    holds; its path leads into the mount, so the helper must never get it."""
    lower = tmp_path / "lower"
    subs = _tree(lower, START_AFTER + 1)
    opens = _Opens(subs)
    stack = LayerStack([str(lower)], fs=Roots(shadow=os.fsencode(lower)))
    pre = Prefetcher(stack)
    try:
        for _ in range(START_AFTER + 1):
            pre.listed(stack.listing(stack.root))
        assert pre.proc is None  # nothing to send: no helper
        assert not opens.seen(subs[0], timeout=0.2)
    finally:
        pre.close()
        opens.close()


@pytest.mark.mount
@pytest.mark.parametrize("flag", ["", "prefetch=0"])
def test_a_walk_of_a_mount_starts_the_helper_which_ends_with_the_mount(tmp_path, fuse, flag):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    subs = _tree(lower, START_AFTER + 2)
    m = LayerfsMount(mnt, [lower], upper, work, extra_opts=flag)
    with m:
        assert m.proc is not None
        daemon = m.proc.pid
        walked = sorted(os.path.relpath(d, mnt) for d, _, _ in os.walk(mnt))
        assert walked == sorted(
            ["."] + [f"d{i}" for i in range(len(subs))] + [f"d{i}/sub" for i in range(len(subs))]
        )
        helpers = _helpers(daemon)
        if flag:
            assert helpers == []
        else:
            assert len(helpers) == 1
    if not flag:
        assert _gone(helpers[0]), "the helper outlived its mount"

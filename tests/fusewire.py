"""Helpers for driving the native FUSE session without a mount: a Session over a pipe, fed
request bytes as the kernel would write them, with the replies read back and parsed."""

from __future__ import annotations

import os
import struct

import trio

from unionfs.fuse import wire
from unionfs.fuse.bridge import Bridge, keep, readdir_reply
from unionfs.fuse.init import Conn
from unionfs.fuse.session import Session
from unionfs.operations import UnionOperations


def conn(**over) -> Conn:
    fields = dict(
        minor=45, kernel_flags=0, flags=wire.DO_READDIRPLUS, max_write=1 << 20,
        max_readahead=1 << 17, no_open=False, no_opendir=False, cache_dir=True, noflush=True,
    )  # fmt: skip
    fields.update(over)
    return Conn(**fields)


class Harness:
    """A Session whose device is a pipe: `send` dispatches one request, `replies` parses
    everything the session wrote since the last call."""

    def __init__(self, stack, writer=None, keep_replies=True, **conn_over) -> None:
        # lower objects' replies kept as the native daemon keeps them (bridge.Kept), unless
        # `keep_replies` is False
        self.ops = UnionOperations(
            stack, writer, readdir_reply=readdir_reply, keep=keep if keep_replies else None
        )
        self.conn = conn(**conn_over)
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.session = Session(self.wfd, self.conn, Bridge(self.ops, self.conn))
        self.unique = 0

    def bridge_dh(self, nodeid: int) -> int:
        """The handler's dir handle the bridge keeps for `nodeid` (no-opendir)."""
        return self.session.bridge._node_dh[nodeid]

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)

    def request(self, opcode: int, nodeid: int, body: bytes) -> tuple[int, bytes]:
        self.unique += 2
        return self.unique, wire.pack_request(opcode, self.unique, nodeid, body, 0, 0, os.getpid())

    async def send_raw(self, raw: bytes) -> None:
        async with trio.open_nursery() as tasks:
            await self.session.dispatch(memoryview(raw), tasks)

    async def call(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        """One request; its (errno, payload)."""
        unique, raw = self.request(opcode, nodeid, body)
        await self.send_raw(raw)
        (reply,) = [r for r in self.replies() if r[0] == unique]
        return reply[1], reply[2]

    def replies(self) -> list[tuple[int, int, bytes]]:
        """(unique, errno, payload) of every reply written since the last call."""
        try:
            data = os.read(self.rfd, 1 << 22)
        except BlockingIOError:
            return []
        out = []
        while data:
            length, error, unique = wire.OUT_HEADER.unpack_from(data, 0)
            assert wire.OUT_HEADER.size <= length <= len(data)
            out.append((unique, -error, data[wire.OUT_HEADER.size : length]))
            data = data[length:]
        return out


def entry_nodeid(payload: bytes) -> int:
    return wire.ENTRY_OUT.unpack_from(payload, 0)[0]


def parse_direntplus(payload: bytes) -> list[tuple[bytes, int, int]]:
    """(name, nodeid, off) of each fuse_direntplus."""
    out, pos = [], 0
    while pos < len(payload):
        nodeid = wire.ENTRY_OUT.unpack_from(payload, pos)[0]
        ino, off, namelen, _typ = wire.DIRENT.unpack_from(payload, pos + wire.ENTRY_OUT.size)
        start = pos + wire.ENTRY_OUT.size + wire.DIRENT.size
        out.append((payload[start : start + namelen], nodeid, off))
        pos += wire.dirent_size(payload[start : start + namelen], plus=True)
    return out


def read_in(fh: int, off: int, size: int) -> bytes:
    return wire.READ_IN.pack(fh, off, size, 0, 0, 0, 0)


def forget_batch(pairs) -> bytes:
    return struct.pack("<II", len(pairs), 0) + b"".join(wire.FORGET_ONE.pack(*p) for p in pairs)

"""The native FUSE transport without a mount: wire parsing, INIT negotiation, the session's
answers to malformed requests, lookup accounting through FORGET, and the bridge's replies."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fusewire import Harness, entry_nodeid, forget_batch, parse_direntplus, read_in
from unionfs.fuse import opcodes, wire
from unionfs.fuse.bridge import Kept, keep
from unionfs.fuse.init import Wanted, negotiate
from unionfs.fuse.session import Session
from unionfs.operations import _HOST_SELINUX
from unionfs.stack import LayerStack

LOOKUP, FORGET, GETATTR, OPEN, READ, GETXATTR = 1, 2, 3, 14, 15, 22
OPENDIR, READDIR, INTERRUPT, BATCH_FORGET, READDIRPLUS, WRITE = 27, 28, 36, 42, 44, 16


def init_body(minor=45, flags=0xFFFFFFFF, flags2=0xFFFFFFFF, major=7) -> bytes:
    return struct.pack("<IIIII", major, minor, 1 << 17, flags, flags2) + bytes(44)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    lo = tmp_path / "lo"
    (lo / "d").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (lo / name).write_bytes(b"data of " + name.encode())
    return lo


@pytest.fixture
def harness(tree):
    h = Harness(LayerStack([str(tree)]))
    yield h
    h.close()


# ----- wire ------------------------------------------------------------------------------
def test_header_round_trip():
    raw = wire.pack_request(LOOKUP, 42, 1, b"name\0", uid=5, gid=6, pid=7)
    h = wire.parse_header(memoryview(raw))
    assert (h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid) == (LOOKUP, 42, 1, 5, 6, 7)
    assert bytes(h.body) == b"name\0"


def test_short_and_inconsistent_headers():
    with pytest.raises(wire.Malformed) as exc:
        wire.parse_header(memoryview(bytes(39)))
    assert exc.value.errno == errno.EIO and getattr(exc.value, "unique", 0) == 0
    raw = wire.pack_request(LOOKUP, 9, 1, b"name\0")
    with pytest.raises(wire.Malformed) as exc:
        wire.parse_header(memoryview(raw[:-2]))  # header length disagrees with the read
    assert exc.value.errno == errno.EIO and exc.value.unique == 9  # type: ignore[attr-defined]


def test_entry_and_attr_packing():
    class A:
        st_ino, generation, st_size, st_blocks, st_mode, st_nlink = 7, 0, 10, 1, 0o100644, 1
        st_uid, st_gid, st_rdev, st_blksize = 1, 2, 0, 4096
        st_atime_ns, st_mtime_ns, st_ctime_ns = 1_500_000_001, 2_000_000_002, 3
        entry_timeout, attr_timeout = 1.5, 86400.0

    e = wire.ENTRY_OUT.unpack(wire.pack_entry(A, 7))
    assert e[:6] == (7, 0, 1, 86400, 500_000_000, 0)
    assert e[6:] == (7, 10, 1, 1, 2, 0, 500_000_001, 2, 3, 0o100644, 1, 1, 2, 0, 4096, 0)
    a = wire.ATTR_OUT.unpack(wire.pack_attr_out(A, 99))
    assert a[0] == 86400 and a[3] == 99  # the shown st_ino, apart from the node id
    A.st_ino = 0  # a negative entry: nodeid 0, only the entry timeout
    assert wire.ENTRY_OUT.unpack(wire.pack_entry(A, 0))[:3] == (0, 0, 1)


def test_native_stand_ins_match_pyfuse3():
    """Under the native transport the handlers use fuseapi's stand-ins instead of pyfuse3's
    types, and nothing the native transport loads imports pyfuse3 (~13 ms of every mount's
    start-up); they have pyfuse3's fields and defaults, and a FUSEError with its errno and
    message.  Under LAYERFS_FUSE=pyfuse3 they are pyfuse3's own."""
    probe = (
        "import os, sys\n"
        "from unionfs import fuseapi\n"
        "import unionfs.operations, unionfs.fuse.bridge, unionfs.fuse.run\n"
        "print(fuseapi.PYFUSE3, 'pyfuse3' in sys.modules)\n"
        "fields = lambda c: sorted(n for n in dir(c) if not n.startswith('_'))\n"
        "print(fields(fuseapi.FileInfo), fields(fuseapi.StatvfsData))\n"
        "e, f, s = fuseapi.FUSEError(2), fuseapi.FileInfo(fh=3), fuseapi.StatvfsData()\n"
        "print(e.errno, str(e), f.fh, f.keep_cache, f.direct_io, f.nonseekable, s.f_namemax,\n"
        "      fuseapi.ENOATTR, fuseapi.RENAME_EXCHANGE,\n"
        "      fuseapi.get_sup_groups(os.getpid()) == set(os.getgroups()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LAYERFS_FUSE"}
    repo = Path(__file__).resolve().parent.parent

    def run(**extra: str) -> list[str]:
        cmd = [sys.executable, "-c", probe]
        done = subprocess.run(
            cmd, env={**env, **extra}, cwd=repo, capture_output=True, text=True, check=True
        )
        return done.stdout.splitlines()

    native, theirs = run(), run(LAYERFS_FUSE="pyfuse3")
    assert native[0] == "False False"  # the stand-ins, and no pyfuse3 loaded
    assert theirs[0] == "True True"
    assert native[1:] == theirs[1:]


def test_native_attrs_reply_as_pyfuse3s_would(monkeypatch):
    """The native transport's `Attrs` stands in for pyfuse3's EntryAttributes: the same
    defaults, so a reply a handler leaves partly filled (a negative entry, a gone file) packs
    the same bytes on both transports, and the shown st_ino kept apart from the node id."""
    import pyfuse3

    from unionfs import operations

    # as under the pyfuse3 transport, whatever this process's handlers were loaded for
    monkeypatch.setattr(
        operations, "_SHOWN_INO_OFFSET", operations._shown_ino_offset(pyfuse3.EntryAttributes)
    )

    ours, theirs = operations.Attrs(), pyfuse3.EntryAttributes()
    for name in operations.Attrs.__slots__:
        if name not in ("shown_ino", "packed_entry", "packed_attr"):  # ours only
            assert getattr(ours, name) == getattr(theirs, name), name
    ours.st_ino = theirs.st_ino = 42
    assert operations.shown_ino(ours) == 42 == wire.ATTR_OUT.unpack(wire.pack_attr_out(ours, 42))[3]
    operations._set_shown_ino(ours, 7)
    operations._set_shown_ino(theirs, 7)
    assert operations.shown_ino(ours) == 7
    if operations._SHOWN_INO_OFFSET is not None:  # else pyfuse3 shows node ids (a warning)
        assert operations.shown_ino(theirs) == 7
        assert wire.pack_entry(ours, 7) == wire.pack_entry(theirs, operations.shown_ino(theirs))


def test_a_lower_objects_reply_is_packed_once_and_a_change_shows(tmp_path):
    """GETATTR and LOOKUP of a lower object hand out the same reply each time, its wire
    bytes packed at the first and kept (`Kept`); a change (chmod, which copies the file up)
    gives a new reply, never the old bytes."""
    h = _writable(tmp_path)
    getattr_in = wire.GETATTR_IN.pack(0, 0, 0)

    async def scenario():
        _, entry = await h.call(LOOKUP, 1, b"f\0")
        f = entry_nodeid(entry)
        _, first = await h.call(GETATTR, f, getattr_in)
        reply = h.ops._entry(h.ops.stack.node(f))
        assert type(reply) is Kept and reply.attr_out() == first and reply.entry == entry
        assert (await h.call(GETATTR, f, getattr_in))[1] == first
        assert (await h.call(LOOKUP, 1, b"f\0"))[1] == entry
        mode = wire.ATTR_OUT.unpack(first)[12]  # fuse_attr_out: 3 fields, then fuse_attr
        chmod = wire.SETATTR_IN.pack(wire.FATTR_MODE, *(0,) * 10, 0o600, 0, 0, 0, 0)
        err, changed = await h.call(4, f, chmod)
        assert err == 0 and wire.ATTR_OUT.unpack(changed)[12] == stat.S_IFREG | 0o600 != mode
        _, after = await h.call(GETATTR, f, getattr_in)
        assert wire.ATTR_OUT.unpack(after)[12] == stat.S_IFREG | 0o600
        _, entry_after = await h.call(LOOKUP, 1, b"f\0")
        assert wire.ENTRY_OUT.unpack(entry_after)[15] == stat.S_IFREG | 0o600  # 6 fields first

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_a_kept_reply_is_its_wire_bytes_and_reads_as_the_reply():
    """What the daemon keeps of a lower object's reply (`Kept`: the fuse_entry_out alone)
    packs as the reply did, GETATTR's fuse_attr_out included, and gives back every field: a
    time before 1970, a size past 32 bits, a shown st_ino apart from the node id.  A device
    node keeps its reply (the wire's rdev has 32 bits)."""
    from unionfs import operations

    def reply(shown):
        a = operations.Attrs()
        a.st_ino, a.shown_ino, a.generation = 5, shown, 0
        a.entry_timeout, a.attr_timeout = 2.25, 1.5  # nanoseconds apart in the bytes
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = stat.S_IFREG | 0o4755, 3, 1000, 100
        a.st_size, a.st_blocks, a.st_blksize = (1 << 40) + 3, 9, 4096
        a.st_atime_ns, a.st_mtime_ns = -1_500_000_000, 1_700_000_000_123_456_789
        a.st_ctime_ns = 7
        return a

    a = reply(77)
    k = keep(a)
    assert type(k) is Kept
    assert k.entry == wire.pack_entry(a, 77) and k.attr_out() == wire.pack_attr_out(a, 77)
    assert (k.st_ino, k.shown_ino, k.st_mode, k.st_size) == (5, 77, a.st_mode, a.st_size)
    assert k.ino_mode() == (77, a.st_mode) and operations.shown_ino(k) == 77
    back = k.expand()
    for name in operations.Attrs.__slots__:
        if name != "packed_attr":
            assert getattr(back, name) == getattr(a, name), name
    assert k.st_mtime_ns == a.st_mtime_ns and k.st_nlink == 3  # any field, through expand
    same = keep(reply(None))  # the shown st_ino is the node id
    assert same.expand().shown_ino is None and same.shown_ino == 5

    dev = operations.Attrs()
    dev.st_ino, dev.st_mode, dev.st_rdev = 6, stat.S_IFCHR | 0o600, os.makedev(300, 70000)
    assert keep(dev) is dev


def test_kept_and_unkept_replies_send_the_same_bytes(tree):
    """The daemon's kept replies change no byte the kernel gets: LOOKUP, GETATTR (first and
    again), FUSE_STATX, READDIRPLUS and an OPEN with the read it stores, over the same
    layer, with replies kept as `Kept` and as the `Attrs` they were made from."""

    async def session(h):
        out = []
        getattr_in = wire.GETATTR_IN.pack(0, 0, 0)
        for _ in range(2):
            for name in (b"a", b"d", b"nothere"):
                out.append(await h.call(LOOKUP, 1, name + b"\0"))
        a, d = (entry_nodeid(out[i][1]) for i in (0, 1))
        for node in (1, a, d, a, d):
            out.append(await h.call(GETATTR, node, getattr_in))
            out.append(await h.call(52, node, wire.STATX_IN.pack(0, 0, 0, 0, 0x7FF)))
        _, dh = await h.call(OPENDIR, 1, wire.OPEN_IN.pack(os.O_RDONLY, 0))
        fh = wire.OPEN_OUT.unpack(dh)[0]
        for _ in range(2):
            out.append(await h.call(READDIRPLUS, 1, read_in(fh, 0, 4096)))
        out.append(await h.call(OPEN, a, wire.OPEN_IN.pack(os.O_RDONLY, 0)))
        return out, h.ops.stack.node(a).reply

    results = []
    for kept in (True, False):
        h = Harness(LayerStack([str(tree)]), keep_replies=kept)
        try:
            results.append(trio.run(session, h))
        finally:
            h.close()
    (with_kept, reply_kept), (without, reply_attrs) = results
    assert type(reply_kept) is Kept and type(reply_attrs) is not Kept
    assert len(with_kept) == len(without)
    for i, (ours, theirs) in enumerate(zip(with_kept, without, strict=True)):
        assert ours == theirs, i


def test_cstrings_need_their_terminator():
    assert wire.cstrings(memoryview(b"ab\0cd\0"), 0, 2) == ([b"ab", b"cd"], 6)
    with pytest.raises(wire.Malformed):
        wire.cstrings(memoryview(b"ab\0cd"), 0, 2)
    assert wire.cstring(memoryview(b"xxab\0cd\0"), 2) == (b"ab", 5)
    assert wire.cstring(memoryview(b"\0"), 0) == (b"", 1)
    for body, offset in ((b"ab", 0), (b"", 0), (b"ab\0", 3), (b"ab\0", 9)):
        with pytest.raises(wire.Malformed):
            wire.cstring(memoryview(body), offset)


# ----- INIT ------------------------------------------------------------------------------
def test_negotiation_grants_only_what_the_kernel_offers():
    payload, conn, err = negotiate(memoryview(init_body()), Wanted(writeback=True))
    assert err == 0 and conn is not None and len(payload) == 64
    assert conn.flags & wire.WRITEBACK_CACHE and conn.flags & wire.CACHE_SYMLINKS
    assert not conn.no_open and conn.max_write == 1 << 20
    assert conn.flags & wire.POSIX_ACL and conn.setxattr_ext  # the kernel checks ACLs
    assert conn.flags & wire.DONT_MASK  # modes come unmasked: a default ACL may decide
    assert conn.killpriv and not conn.passthrough
    # with the writeback cache the kernel truncates by SETATTR, after its writes in flight
    assert not conn.flags & wire.ATOMIC_O_TRUNC
    fields = wire.INIT_OUT.unpack(payload)
    assert fields[:2] == (7, 45) and fields[8] == 256  # max_pages
    assert fields[11] == 0  # max_stack_depth: no passthrough
    offered = wire.ASYNC_READ | wire.DO_READDIRPLUS  # an old-fashioned kernel
    _, conn, _ = negotiate(memoryview(init_body(flags=offered, flags2=0)), Wanted(writeback=True))
    assert conn is not None and conn.flags == offered and conn.max_write == 32 * 4096
    assert not conn.setxattr_ext  # not offered, not assumed: SETXATTR keeps its 8-byte header
    _, conn, _ = negotiate(memoryview(init_body()), Wanted(posix_acl=False))
    assert not conn.flags & (wire.POSIX_ACL | wire.SETXATTR_EXT | wire.DONT_MASK)


def test_negotiation_passthrough_excludes_the_writeback_cache():
    payload, conn, _ = negotiate(memoryview(init_body()), Wanted(writeback=True, passthrough=True))
    assert conn.passthrough and not conn.flags & wire.WRITEBACK_CACHE
    assert conn.flags & wire.ATOMIC_O_TRUNC  # no writeback cache: O_TRUNC comes with OPEN
    assert wire.INIT_OUT.unpack(payload)[11] == 1  # max_stack_depth: backing files unstacked
    no_pt = init_body(flags2=(0xFFFFFFFF & ~(wire.PASSTHROUGH >> 32)))
    _, conn, _ = negotiate(memoryview(no_pt), Wanted(writeback=True, passthrough=True))
    assert not conn.passthrough and conn.flags & wire.WRITEBACK_CACHE  # the fallback
    assert not conn.flags & wire.ATOMIC_O_TRUNC
    _, ro, _ = negotiate(memoryview(init_body()), Wanted(read_only=True, passthrough=True))
    assert not ro.passthrough and not ro.killpriv  # nothing is written on a read-only stack


def test_negotiation_no_open_only_for_read_only_stacks():
    _, ro, _ = negotiate(memoryview(init_body()), Wanted(read_only=True))
    _, rw, _ = negotiate(memoryview(init_body()), Wanted(read_only=False))
    assert ro.no_open and ro.no_opendir and not ro.flags & wire.WRITEBACK_CACHE
    assert not rw.no_open and rw.no_opendir  # opening a directory never copies up
    no_flag = 0xFFFFFFFF & ~(wire.NO_OPEN_SUPPORT | wire.NO_OPENDIR_SUPPORT)
    _, old, _ = negotiate(memoryview(init_body(flags=no_flag)), Wanted(read_only=True))
    assert not old.no_open and not old.no_opendir


def test_negotiation_minor_gates():
    _, conn, err = negotiate(memoryview(init_body(minor=30)), Wanted())
    assert conn is None and err == errno.EPROTO
    _, conn, _ = negotiate(memoryview(init_body(minor=31, flags2=0)), Wanted())
    assert conn.minor == 31 and not conn.noflush and conn.cache_dir
    payload, conn, err = negotiate(memoryview(init_body(major=8)), Wanted())
    assert conn is None and err == 0 and wire.INIT_OUT.unpack(payload)[:2] == (7, 45)
    with pytest.raises(wire.Malformed):
        negotiate(memoryview(b"\7\0\0\0"), Wanted())


# ----- the session: malformed requests --------------------------------------------------
def test_unknown_and_truncated_requests_get_errnos(harness):
    async def scenario():
        assert (await harness.call(4242, 1))[0] == errno.ENOSYS
        assert (await harness.call(LOOKUP, 1, b"no-terminator"))[0] == errno.EINVAL
        assert (await harness.call(READ, 1, b"\0" * 8))[0] == errno.EINVAL
        assert (await harness.call(GETXATTR, 1, b"\0\0\0\0"))[0] == errno.EINVAL
        body = wire.WRITE_IN.pack(1, 0, 100, 0, 0, 0, 0) + b"short"
        assert (await harness.call(WRITE, 1, body))[0] == errno.EINVAL
        many = struct.pack("<II", 1000, 0) + wire.FORGET_ONE.pack(1, 1)
        unique, raw = harness.request(BATCH_FORGET, 0, many)
        await harness.send_raw(raw)  # no reply, no exception
        unique, raw = harness.request(LOOKUP, 1, b"a\0")
        await harness.send_raw(raw[:-1])  # the read is shorter than its header says
        assert harness.replies() == [(unique, errno.EIO, b"")]
        assert (await harness.call(LOOKUP, 1, b"a\0"))[0] == 0  # still serving

    trio.run(scenario)


def _requests():
    codes = st.sampled_from(sorted(opcodes.OPCODES) + [0, 26, 99, 2**32 - 1])
    return st.tuples(codes, st.sampled_from([0, 1, 2, 12345]), st.binary(max_size=200))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(reqs=st.lists(_requests(), max_size=8), cut=st.integers(0, 300))
def test_random_requests_never_escape_the_loop(tree, reqs, cut):
    """Random opcodes, nodeids and bodies, and truncated reads: every request is answered at
    most once, never with a raise out of dispatch, and the session still serves afterwards."""
    h = Harness(LayerStack([str(tree)]))
    try:

        async def scenario():
            sent = []
            for code, nodeid, body in reqs:
                unique, raw = h.request(code, nodeid, body)
                sent.append(unique)
                await h.send_raw(raw)
                await h.send_raw(raw[: cut % (len(raw) + 1)])
            replies = h.replies()
            uniques = [u for u, _, _ in replies]
            assert set(uniques) <= set(sent) and all(e >= 0 for _, e, _ in replies)
            assert (await h.call(LOOKUP, 1, b"a\0"))[0] == 0

        trio.run(scenario)
    finally:
        h.close()


# ----- lookup accounting -----------------------------------------------------------------
def test_forget_accounting_lookup_and_readdirplus(harness):
    nodes = harness.ops.stack.nodes

    async def scenario():
        err, payload = await harness.call(LOOKUP, 1, b"a\0")
        a = entry_nodeid(payload)
        await harness.call(LOOKUP, 1, b"a\0")
        assert nodes[a].lookups == 2
        err, dh = await harness.call(OPENDIR, 1, wire.OPEN_IN.pack(os.O_RDONLY, 0))
        fh = wire.OPEN_OUT.unpack(dh)[0]
        err, listing = await harness.call(READDIRPLUS, 1, read_in(fh, 0, 4096))
        entries = {name: nodeid for name, nodeid, _ in parse_direntplus(listing)}
        assert set(entries) == {b".", b"..", b"a", b"b", b"c", b"d"}
        assert entries[b"."] == 0 and entries[b".."] == 0  # dots: no entry, no count
        assert nodes[a].lookups == 3 and nodes[entries[b"b"]].lookups == 1
        err, plain = await harness.call(READDIR, 1, read_in(fh, 0, 4096))
        assert err == 0 and nodes[a].lookups == 3  # plain READDIR makes no references
        unique, raw = harness.request(FORGET, a, wire.FORGET_IN.pack(1))
        await harness.send_raw(raw)
        assert nodes[a].lookups == 2
        pairs = [(a, 2)] + [(entries[n], 1) for n in (b"b", b"c", b"d")]
        unique, raw = harness.request(BATCH_FORGET, 0, forget_batch(pairs))
        await harness.send_raw(raw)
        assert harness.replies() == []  # FORGETs are never answered
        assert set(nodes) == {1}

    trio.run(scenario)


def test_readdirplus_stops_at_the_buffer_and_counts_only_what_fits(harness):
    nodes = harness.ops.stack.nodes

    async def scenario():
        _, dh = await harness.call(OPENDIR, 1, wire.OPEN_IN.pack(os.O_RDONLY, 0))
        fh = wire.OPEN_OUT.unpack(dh)[0]
        one = wire.dirent_size(b"a", plus=True)
        _, part = await harness.call(READDIRPLUS, 1, read_in(fh, 0, 3 * one))
        got = parse_direntplus(part)
        assert [n for n, _, _ in got][:2] == [b".", b".."] and len(got) == 3
        assert sum(n.lookups for ino, n in nodes.items() if ino != 1) == 1
        _, rest = await harness.call(READDIRPLUS, 1, read_in(fh, got[-1][2], 4096))
        names = [got[2][0]] + [n for n, _, _ in parse_direntplus(rest)]
        assert sorted(names) == [b"a", b"b", b"c", b"d"]

    trio.run(scenario)


# ----- replies of the bridge ---------------------------------------------------------------
def test_getxattr_sizes_and_read(harness, tree):
    os.setxattr(tree / "a", b"user.k", b"value")

    async def scenario():
        _, payload = await harness.call(LOOKUP, 1, b"a\0")
        a = entry_nodeid(payload)
        err, out = await harness.call(GETXATTR, a, wire.GETXATTR_IN.pack(0, 0) + b"user.k\0")
        assert err == 0 and wire.GETXATTR_OUT.unpack(out)[0] == 5
        err, _ = await harness.call(GETXATTR, a, wire.GETXATTR_IN.pack(2, 0) + b"user.k\0")
        assert err == errno.ERANGE
        err, out = await harness.call(GETXATTR, a, wire.GETXATTR_IN.pack(64, 0) + b"user.k\0")
        assert (err, out) == (0, b"value")
        # no such attribute: an errno the handler returns rather than raises (_answer)
        err, out = await harness.call(GETXATTR, a, wire.GETXATTR_IN.pack(64, 0) + b"user.no\0")
        assert (err, out) == (errno.ENODATA, b"")
        selinux = wire.GETXATTR_IN.pack(64, 0) + b"security.selinux\0"
        err, _ = await harness.call(GETXATTR, a, selinux)
        assert err == (errno.ENODATA if _HOST_SELINUX else errno.EOPNOTSUPP)
        assert (await harness.call(GETXATTR, 999, selinux))[0] == errno.ESTALE  # raised
        err, oo = await harness.call(OPEN, a, wire.OPEN_IN.pack(os.O_RDONLY, 0))
        fh, oflags, _ = wire.OPEN_OUT.unpack(oo)
        assert oflags & wire.FOPEN_KEEP_CACHE and oflags & wire.FOPEN_NOFLUSH
        assert await harness.call(READ, a, read_in(fh, 2, 100)) == (0, b"ta of a")
        err, _ = await harness.call(OPEN, a, wire.OPEN_IN.pack(os.O_WRONLY, 0))
        assert err == errno.EROFS

    trio.run(scenario)


def test_no_open_reads_by_inode_and_releases_at_forget(tree):
    h = Harness(LayerStack([str(tree)]), no_open=True, no_opendir=True)

    async def scenario():
        _, payload = await h.call(LOOKUP, 1, b"b\0")
        b = entry_nodeid(payload)
        assert (await h.call(OPEN, b, wire.OPEN_IN.pack(os.O_RDONLY, 0)))[0] == errno.ENOSYS
        assert (await h.call(OPENDIR, 1, wire.OPEN_IN.pack(os.O_RDONLY, 0)))[0] == errno.ENOSYS
        assert await h.call(READ, b, read_in(0, 0, 100)) == (0, b"data of b")
        _, listing = await h.call(READDIRPLUS, 1, read_in(0, 0, 4096))
        assert len(parse_direntplus(listing)) == 6
        assert len(h.ops._files) == 1
        unique, raw = h.request(FORGET, b, wire.FORGET_IN.pack(2))
        await h.send_raw(raw)
        assert b not in h.ops.stack.nodes and not h.ops._files  # its fd is closed

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_opendir_caches_only_directories_outside_the_upper(tmp_path):
    from unionfs.writer import Writer

    lo, up, wk = (tmp_path / n for n in ("lo", "up", "wk"))
    for d in (lo / "low", up / "both", lo / "both", wk):
        d.mkdir(parents=True)
    stack = LayerStack([str(lo)], str(up))
    h = Harness(stack, Writer(stack, str(wk)))

    async def scenario():
        flags = {}
        for name in (b"low", b"both"):
            _, payload = await h.call(LOOKUP, 1, name + b"\0")
            _, oo = await h.call(OPENDIR, entry_nodeid(payload), wire.OPEN_IN.pack(0, 0))
            flags[name] = wire.OPEN_OUT.unpack(oo)[1]
        assert flags[b"low"] == wire.FOPEN_CACHE_DIR | wire.FOPEN_KEEP_CACHE
        assert flags[b"both"] == 0

    try:
        trio.run(scenario)
    finally:
        h.close()


def _writable(tmp_path: Path) -> Harness:
    """A Harness over one lower holding the file `f`, with an upper and a Writer."""
    from unionfs.writer import Writer

    lo, up, wk = (tmp_path / n for n in ("lo", "up", "wk"))
    for d in (lo, up, wk):
        d.mkdir()
    (lo / "f").write_bytes(b"x")
    stack = LayerStack([str(lo)], str(up))
    return Harness(stack, Writer(stack, str(wk)))


def _abc_harness(tmp_path: Path) -> Harness:
    """A no-opendir session over a lower directory holding a, b and c, with an upper."""
    from unionfs.writer import Writer

    lo, up, wk = (tmp_path / n for n in ("lo", "up", "wk"))
    for d in (lo, up, wk):
        d.mkdir()
    for name in ("a", "b", "c"):
        (lo / name).write_bytes(b"x")
    stack = LayerStack([str(lo)], str(up))
    return Harness(stack, Writer(stack, str(wk)), no_opendir=True)


def test_no_opendir_readers_of_one_directory_keep_their_own_listing(tmp_path):
    """With no-opendir every reader of a directory shares one handle: a reader that started
    before a change goes on in the listing it started (each offset names its snapshot),
    one that starts after sees the change, and a finished snapshot is dropped."""
    h = _abc_harness(tmp_path)

    async def scenario():
        one = wire.dirent_size(b"a", plus=True)
        _, part = await h.call(READDIRPLUS, 1, read_in(0, 0, 3 * one))
        first = parse_direntplus(part)  # ., .. and one name
        assert len(first) == 3 and all(off >> 32 == 0 for _, _, off in first)
        err, _ = await h.call(9, 1, wire.MKDIR_IN.pack(0o755, 0) + b"new\0")  # MKDIR
        assert err == 0
        _, whole = await h.call(READDIRPLUS, 1, read_in(0, 0, 4096))
        second = parse_direntplus(whole)
        assert {n for n, _, _ in second} == {b".", b"..", b"a", b"b", b"c", b"new"}
        assert all(off >> 32 == 1 for _, _, off in second)  # the second snapshot
        _, rest = await h.call(READDIRPLUS, 1, read_in(0, first[-1][2], 4096))
        names = [n for n, _, _ in first[2:] + parse_direntplus(rest)]
        assert sorted(names) == [b"a", b"b", b"c"]  # its own listing: no "new", no repeat
        _, end = await h.call(READDIRPLUS, 1, read_in(0, parse_direntplus(rest)[-1][2], 4096))
        assert end == b""
        handle = h.ops._dirs[h.bridge_dh(1)]
        assert list(handle.snapshots) == [1]  # the first was read to its end: dropped

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_seeking_back_into_a_listing_read_to_its_end(tmp_path):
    """A reader seeks back to an offset of the newest listing after reading it to its end
    (which dropped it) while an older reader's listing is still kept: it goes on in a new
    listing.  It met the dropped generation (KeyError: EIO, xfstests generic/637)."""
    h = _abc_harness(tmp_path)

    async def scenario():
        one = wire.dirent_size(b"a", plus=True)
        await h.call(READDIRPLUS, 1, read_in(0, 0, 3 * one))  # an older reader, part way
        err, _ = await h.call(9, 1, wire.MKDIR_IN.pack(0o755, 0) + b"new\0")  # MKDIR
        assert err == 0
        _, whole = await h.call(READDIRPLUS, 1, read_in(0, 0, 4096))
        second = parse_direntplus(whole)
        _, end = await h.call(READDIRPLUS, 1, read_in(0, second[-1][2], 4096))
        assert end == b""  # read to its end: dropped
        err, again = await h.call(READDIRPLUS, 1, read_in(0, second[2][2], 4096))
        assert err == 0
        assert [n for n, _, _ in parse_direntplus(again)] == [n for n, _, _ in second[3:]]

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_a_reader_going_on_after_a_removal_skips_the_removed_name(tmp_path):
    """A reader part way through a listing when a name in its rest is removed goes on
    without it.  The removed file's node, which the kernel had not forgotten yet (its
    READDIRPLUS entry counted a lookup), was taken for the name and answered ENOENT for the
    whole request: the reader's getdents failed (test_fuse_native's seeking-back test, now
    and then, as the FORGET came after the read or before it)."""
    h = _abc_harness(tmp_path)

    async def scenario():
        one = wire.dirent_size(b"a", plus=True)
        _, whole = await h.call(READDIRPLUS, 1, read_in(0, 0, 4096))  # every node looked up
        names = [n for n, _, _ in parse_direntplus(whole)]
        _, part = await h.call(READDIRPLUS, 1, read_in(0, 0, 3 * one))  # a reader, part way
        got = parse_direntplus(part)
        assert [n for n, _, _ in got] == names[:3]
        err, _ = await h.call(10, 1, names[-1] + b"\0")  # UNLINK of a name still to come
        assert err == 0
        err, rest = await h.call(READDIRPLUS, 1, read_in(0, got[-1][2], 4096))
        assert err == 0
        assert [n for n, _, _ in parse_direntplus(rest)] == names[3:-1]

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_snapshot_generations_keep_offsets_positive():
    """The generation rides in an offset's high bits: it wraps at 31 bits, so every offset
    stays a valid (signed) loff_t, and at most SNAPSHOTS listings are kept."""
    from unionfs.operations import DirHandle

    def listing(n: int) -> list:
        return [(str(i).encode(), None) for i in range(n)]

    handle = DirHandle(None)  # type: ignore[arg-type]
    handle.gen = 0x7FFFFFFE
    assert handle.snapshot(listing(1)) == 0x7FFFFFFF and handle.snapshot(listing(2)) == 0
    for n in range(10):
        handle.snapshot(listing(3 + n))
    assert len(handle.snapshots) == DirHandle.SNAPSHOTS
    assert (0x7FFFFFFF << 32 | 0xFFFFFFFF) < 1 << 63


def test_a_listing_of_the_same_names_keeps_its_generation():
    """Listed again from the start with nothing changed, a directory keeps its offsets (the
    newest generation, kept last among the snapshots); a change of a name or of the order
    starts a new one."""
    from unionfs.operations import DirHandle

    handle = DirHandle(None)  # type: ignore[arg-type]
    a = [(b"a", None), (b"b", None)]
    assert handle.snapshot(list(a)) == 0 and handle.snapshot(list(a)) == 0
    assert handle.snapshot(a[::-1]) == 1 and handle.snapshot(a[:1]) == 2
    assert handle.snapshot([(b"x", None)]) == 3
    assert handle.snapshot([(b"x", None)]) == 3 and list(handle.snapshots) == [0, 1, 2, 3]
    assert handle.snapshot(list(a)) == 4 and list(handle.snapshots) == [1, 2, 3, 4]


def test_interrupt_cancels_a_waiting_request(tmp_path):
    h = _writable(tmp_path)

    async def scenario():
        _, payload = await h.call(LOOKUP, 1, b"f\0")
        f = entry_nodeid(payload)
        await h.ops.gate.freeze()  # a frozen mount holds every mutating request
        async with trio.open_nursery() as tasks:
            unique, raw = h.request(OPEN, f, wire.OPEN_IN.pack(os.O_WRONLY, 0))
            assert await h.session.dispatch(memoryview(raw), tasks)  # started as a task
            await trio.testing.wait_all_tasks_blocked()
            assert h.replies() == []  # held, and the loop was not stalled
            err, _ = await h.call(GETATTR, f, bytes(16))
            assert err == 0
            _, intr = h.request(INTERRUPT, 0, wire.INTERRUPT_IN.pack(unique))
            await h.session.dispatch(memoryview(intr), tasks)
        assert h.replies() == [(unique, errno.EINTR, b"")]
        h.ops.gate.thaw()

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_gated_requests_run_inline_unless_the_mount_is_frozen(tmp_path):
    """MKDIR (GATED) is answered by `dispatch` itself while the mount is not frozen; while it
    is, it waits as a task and the loop goes on answering (as TASK requests always do).  An
    UNLINK is a task also while a copy-up is in progress, an OPEN for writing while its file
    is not in the upper yet."""
    h = _writable(tmp_path)
    (tmp_path / "lo" / "g").write_bytes(b"y")  # before the first listing
    s = h.session
    mkdir = opcodes.OPCODES[9]
    assert mkdir.mode == opcodes.GATED

    async def scenario():
        async with trio.open_nursery() as tasks:
            unique, raw = h.request(9, 1, wire.MKDIR_IN.pack(0o755, 0) + b"a\0")
            assert not await s.dispatch(memoryview(raw), tasks)  # inline
            assert [(r[0], r[1]) for r in h.replies()] == [(unique, 0)]
            await h.ops.gate.freeze()
            unique, raw = h.request(9, 1, wire.MKDIR_IN.pack(0o755, 0) + b"b\0")
            assert await s.dispatch(memoryview(raw), tasks)  # a task, held at the gate
            await trio.testing.wait_all_tasks_blocked()
            assert h.replies() == []
            err, _ = await h.call(GETATTR, 1, bytes(16))
            assert err == 0  # the loop was not stalled
            h.ops.gate.thaw()
        assert [(r[0], r[1]) for r in h.replies()] == [(unique, 0)]
        assert (tmp_path / "up" / "a").is_dir() and (tmp_path / "up" / "b").is_dir()
        # an UNLINK may also wait behind a copy-up in progress (`_quiesce`): a task then
        async with trio.open_nursery() as tasks:
            await h.call(LOOKUP, 1, b"a\0")
            h.ops.copying += 1
            unique, raw = h.request(opcodes.OPCODES[11].code, 1, b"a\0")  # RMDIR: never
            assert not await s.dispatch(memoryview(raw), tasks)
            await h.call(LOOKUP, 1, b"f\0")
            unique, raw = h.request(10, 1, b"f\0")
            assert await s.dispatch(memoryview(raw), tasks)
            h.ops.copying -= 1
        assert [(r[0], r[1]) for r in h.replies()][-1] == (unique, 0)
        unique, raw = h.request(10, 1, b"b\0")  # a directory: EISDIR, answered inline
        async with trio.open_nursery() as tasks:
            assert not await s.dispatch(memoryview(raw), tasks)
        # an OPEN for writing copies a lower file up first (under the node's lock, a big one
        # in a worker thread): a task; once the file is in the upper, inline
        _, payload = await h.call(LOOKUP, 1, b"g\0")
        g = entry_nodeid(payload)
        async with trio.open_nursery() as tasks:
            for inline in (False, True):
                unique, raw = h.request(OPEN, g, wire.OPEN_IN.pack(os.O_WRONLY, 0))
                assert await s.dispatch(memoryview(raw), tasks) is not inline
                with trio.fail_after(10):  # the copy-up's copy and fsync: a worker thread
                    while not (answered := h.replies()):
                        await trio.sleep(0.005)
                assert [(r[0], r[1]) for r in answered] == [(unique, 0)]
        assert (tmp_path / "up" / "g").read_bytes() == b"y"

    try:
        trio.run(scenario)
    finally:
        h.close()


def _socket_replies(kernel) -> list[tuple[int, int]]:
    """(unique, errno) of every reply the session wrote to a SEQPACKET socketpair (one reply
    a message) since the last call."""
    import socket

    out = []
    while True:
        try:
            data = kernel.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        _, error, unique = wire.OUT_HEADER.unpack_from(data, 0)
        out.append((unique, -error))


def test_before_trio_the_session_answers_until_a_request_must_be_a_task(tmp_path):
    """`serve_early` (trio not loaded yet) answers what the loop would run inline, reads and
    writes in the upper alike, in order, and stops at the first request that must be a task
    (an OPEN for writing of a lower file: a copy-up), unanswered; `serve` then dispatches
    that one first and reads on.  Each request is counted once.  With nothing to answer, it
    stops when a wake-up fd turns readable (a control client, a signal)."""
    import socket

    h = _writable(tmp_path)
    up = tmp_path / "up"
    device, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a read each
    s = Session(device.fileno(), h.conn, h.session.bridge)
    f = entry_nodeid(trio.run(h.call, LOOKUP, 1, b"f\0")[1])
    early = [
        h.request(GETATTR, f, bytes(16)),
        h.request(OPEN, f, wire.OPEN_IN.pack(os.O_RDONLY, 0)),
        h.request(9, 1, wire.MKDIR_IN.pack(0o755, 0) + b"d\0"),  # MKDIR in the upper root
    ]
    copy_up = h.request(OPEN, f, wire.OPEN_IN.pack(os.O_WRONLY, 0))
    later = [h.request(GETATTR, 1, bytes(16)), h.request(opcodes.DESTROY, 0, b"")]
    for _, raw in [*early, copy_up, *later]:
        kernel.send(raw)
    wake_r, wake_w = os.pipe()

    def replies() -> list[tuple[int, int]]:
        return _socket_replies(kernel)

    try:
        pending = s.serve_early([wake_r])
        assert pending == copy_up[1]
        assert replies() == [(u, 0) for u, _ in early]
        assert (up / "d").is_dir() and not (up / "f").exists()
        trio.run(s.serve, pending)
        # the copy-up is a task (its fsync in a thread): the rest may be answered before it
        assert sorted(replies()) == [(u, 0) for u, _ in [copy_up, *later]]
        assert (up / "f").read_bytes() == b"x"
        assert s.counts[OPEN] == 2 and s.counts[GETATTR] == 2
        s2 = Session(device.fileno(), h.conn, h.session.bridge)
        client = threading.Timer(0.05, os.write, (wake_w, b"x"))
        client.start()
        assert s2.serve_early([wake_r]) is None and not s2.unmounted_early
        client.join()
    finally:
        device.close()
        kernel.close()
        os.close(wake_r)
        os.close(wake_w)
        h.close()


def test_the_session_reads_on_for_spin_microseconds_before_it_sleeps(tmp_path):
    """`spin=`: after an answer the session keeps reading the device for spin_us; a request
    that comes meanwhile is read without sleeping, and with none it gives up once the time
    is over (0: nothing read)."""
    h = _writable(tmp_path)
    r, w = os.pipe()
    os.set_blocking(r, False)
    s = Session(r, h.conn, h.session.bridge, spin_us=200_000)
    buf = bytearray(4096)
    try:
        timer = threading.Timer(0.01, os.write, (w, b"x" * 40))
        timer.start()
        t0 = time.monotonic()
        assert s._spin(buf) == 40  # came while it spun
        assert time.monotonic() - t0 < 0.2
        timer.join()
        s.spin_ns = 20_000_000
        t0 = time.monotonic()
        assert s._spin(buf) == 0  # nothing came: gave up after 20 ms
        assert time.monotonic() - t0 >= 0.02
    finally:
        os.close(r)
        os.close(w)
        h.close()


def test_the_loop_waits_outside_trio_only_while_nothing_else_is_due(tmp_path):
    """`may_block` lets the session wait in poll(2), holding trio's thread: never while a
    request task is alive — even one started and not yet run (each rm -rf unlink waited
    POLL_MS when only running tasks counted) — nor while a task is runnable or a deadline
    is near."""
    from unionfs.fuse.session import POLL_MS

    h = _writable(tmp_path)
    s = h.session

    async def scenario():
        _, payload = await h.call(LOOKUP, 1, b"f\0")
        f = entry_nodeid(payload)
        assert s.may_block(trio)
        async with trio.open_nursery() as tasks:
            unique, raw = h.request(OPEN, f, wire.OPEN_IN.pack(os.O_WRONLY, 0))
            assert await s.dispatch(memoryview(raw), tasks)  # a copy-up first: a task
            assert not s.may_block(trio)  # started, not yet run
        assert [r[0] for r in h.replies()] == [unique]
        assert s.may_block(trio)  # answered and gone
        await h.ops.gate.freeze()
        async with trio.open_nursery() as tasks:
            unique, raw = h.request(OPEN, f, wire.OPEN_IN.pack(os.O_WRONLY, 0))
            await s.dispatch(memoryview(raw), tasks)
            await trio.testing.wait_all_tasks_blocked()
            assert not s.may_block(trio)  # held by the gate: thawing needs trio
            h.ops.gate.thaw()
        assert [r[0] for r in h.replies()] == [unique]
        async with trio.open_nursery() as tasks:
            tasks.start_soon(trio.lowlevel.checkpoint)
            assert not s.may_block(trio)  # another task is runnable
        with trio.move_on_after(POLL_MS / 2000):
            assert not s.may_block(trio)  # a deadline comes before POLL_MS is over
        assert s.may_block(trio)

    try:
        trio.run(scenario)
    finally:
        h.close()


def test_setxattr_header_follows_the_negotiation():
    """SETXATTR's header is 8 bytes, or 16 with FUSE_SETXATTR_EXT (setxattr_flags): the
    connection's table decodes the one INIT granted; a truncated one is an errno."""
    value = b"\2\0\0\0"

    def decode(table, body):
        raw = wire.pack_request(21, 1, 1, body)
        return table[21].decode(wire.parse_header(memoryview(raw)))

    compat = wire.SETXATTR_IN.pack(len(value), 1) + b"system.posix_acl_access\0" + value
    ext = wire.SETXATTR_IN_EXT.pack(len(value), 2, wire.SETXATTR_ACL_KILL_SGID, 0)
    ext += b"system.posix_acl_access\0" + value
    assert opcodes.table(False) is opcodes.OPCODES
    assert decode(opcodes.table(False), compat) == (b"system.posix_acl_access", value, 1, 0)
    assert decode(opcodes.table(True), ext) == (b"system.posix_acl_access", value, 2, 1)
    with pytest.raises(wire.Malformed):
        decode(opcodes.table(True), ext[:12])
    with pytest.raises(wire.Malformed):
        decode(opcodes.table(True), ext[:-1])  # the value is shorter than announced


def test_setattr_arguments():
    from unionfs.fuse.bridge import setattr_args

    valid = wire.FATTR_SIZE | wire.FATTR_MTIME | wire.FATTR_ATIME_NOW | wire.FATTR_FH
    raw = wire.SETATTR_IN.pack(valid, 0, 9, 123, 0, 5, 7, 0, 6, 8, 0, 0o644, 0, 1, 2, 0)
    (fields,) = opcodes.OPCODES[4].decode(wire.parse_header(memoryview(
        wire.pack_request(4, 1, 1, raw))))  # fmt: skip
    attrs, which, fh = setattr_args(fields)
    assert fh == 9 and attrs.st_size == 123 and attrs.st_mtime_ns == 7_000_000_008
    assert which.update_size and which.update_mtime and which.update_atime
    assert not (which.update_mode or which.update_uid or which.update_gid)
    assert abs(attrs.st_atime_ns - time.time_ns()) < 5_000_000_000  # ATIME_NOW: now
    _, _, fh = setattr_args((wire.FATTR_MODE,) + fields[1:])
    assert fh is None  # no FATTR_FH: the kernel named no handle


@pytest.mark.parametrize("before_trio", [True, False])
def test_releases_are_answered_after_the_requests_behind_them(tmp_path, before_trio):
    """RELEASE is sent in the background (nobody waits for it): the session keeps it and
    answers the requests queued behind it first (`cat`'s next OPEN), and the kept ones once
    the device is idle.  Never later than a request for a node one of them names (whether a
    file of it is open decides answers: ETXTBSY for a passthrough reader), than DESTROY, or
    than MAX_DEFERRED of them; the same before trio (`serve_early`) and in trio's loop."""
    import socket

    from unionfs.fuse.session import MAX_DEFERRED

    h = _writable(tmp_path)
    device, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # a read each
    s = Session(device.fileno(), h.conn, h.session.bridge)
    f = entry_nodeid(trio.run(h.call, LOOKUP, 1, b"f\0")[1])

    def opened() -> int:
        err, payload = trio.run(h.call, OPEN, f, wire.OPEN_IN.pack(os.O_RDONLY, 0))
        assert err == 0
        return wire.OPEN_OUT.unpack_from(payload, 0)[0]

    fhs = [opened() for _ in range(MAX_DEFERRED + 4)]

    def release(fh: int) -> tuple[int, bytes]:
        return h.request(18, f, wire.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0))

    def replies() -> list[int]:
        answers = _socket_replies(kernel)
        assert all(error == 0 for _, error in answers), answers
        return [unique for unique, _ in answers]

    def serve() -> None:
        if before_trio:
            pending = s.serve_early([])
            assert pending is not None  # DESTROY is trio's to answer
            trio.run(s.serve, pending)
        else:
            trio.run(s.serve)

    r0, g1, r1 = release(fhs[0]), h.request(GETATTR, 1, bytes(16)), release(fhs[1])
    reopen = h.request(OPEN, f, wire.OPEN_IN.pack(os.O_RDONLY, 0))  # names their node
    many = [release(fh) for fh in fhs[2 : 2 + MAX_DEFERRED]]
    g2, last = h.request(GETATTR, 1, bytes(16)), release(fhs[-2])
    destroy = h.request(opcodes.DESTROY, 0, b"")
    sent = [r0, g1, r1, reopen, *many, g2, last, destroy]
    for _, raw in sent:
        kernel.send(raw)
    try:
        serve()
        order = [g1, r0, r1, reopen, *many, g2, last, destroy]
        assert replies() == [u for u, _ in order]
        assert h.ops.open_handles(f) == 2  # the one reopened, and fhs[-1]
        # alone, it is answered once the device is idle (here: before the loop sleeps)
        alone = release(fhs[-1])
        kernel.send(alone[1])
        s2 = Session(device.fileno(), h.conn, h.session.bridge)
        wake_r, wake_w = os.pipe()
        try:
            if before_trio:
                timer = threading.Timer(0.2, os.write, (wake_w, b"x"))
                timer.start()
                assert s2.serve_early([wake_r]) is None
                timer.join()
            else:

                async def until_idle() -> None:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(s2.serve)
                        await trio.sleep(0.2)
                        s2.terminate()

                trio.run(until_idle)
        finally:
            os.close(wake_r)
            os.close(wake_w)
        assert replies() == [alone[0]]
        assert h.ops.open_handles(f) == 1
    finally:
        device.close()
        kernel.close()
        h.close()


def test_kept_releases_are_due_before_forget_and_once_old(tmp_path):
    """The rules `_due` adds to the ones above: kept releases are answered before a FORGET or
    BATCH_FORGET (it may end the node they name) and once the oldest has waited
    DEFER_MAX_NS, whatever comes (a steady stream never leaves the device idle)."""
    from unionfs.fuse.session import DEFER_MAX_NS

    h = _writable(tmp_path)
    s = h.session

    def header(opcode: int, nodeid: int) -> wire.Header:
        return wire.Header(opcode, 2, nodeid, 0, 0, 0, memoryview(b""))

    try:
        assert not s._keep(header(18, 7), (1, 0, 0, 0))
        assert s._due(header(GETATTR, 7))  # the node it names
        assert not s._due(header(GETATTR, 1))
        assert s._due(header(FORGET, 9)) and s._due(header(BATCH_FORGET, 0))
        assert s._due(header(opcodes.DESTROY, 0))
        s._deferred_at -= DEFER_MAX_NS + 1
        assert s._due(header(GETATTR, 1))
        assert s._keep(header(18, 8), (2, 0, 0, 0))  # full: due at once
    finally:
        h.close()

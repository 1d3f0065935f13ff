"""LayerStack, the pure union model, without a mount."""

from __future__ import annotations

import errno
import os
import stat
import types
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.layerdata import oci_whiteout, opaque, whiteout, write
from unionfs.errors import NotFound
from unionfs.stack import LayerStack


def resolve(stack: LayerStack, path: str):
    node = stack.root
    for part in path.strip("/").split("/"):
        if part:
            node = stack.lookup(node, part.encode())
    return node


def names(stack: LayerStack, path: str) -> list[bytes]:
    return sorted(stack.listing(resolve(stack, path)))


def make(tmp_path: Path, n: int) -> list[Path]:
    layers = [tmp_path / f"l{i}" for i in range(n)]
    for p in layers:
        p.mkdir(parents=True)
    return layers  # bottom first here; LayerStack takes top-first


def test_oci_whiteout_hides_only_lower_layers(tmp_path):
    lo, hi = make(tmp_path, 2)
    write(lo / "a", b"lower")
    oci_whiteout(hi / "a")
    write(hi / "b", b"same layer")
    oci_whiteout(hi / "b")  # a whiteout does not hide its own layer's entry
    s = LayerStack([str(hi), str(lo)])
    assert names(s, "/") == [b"b"]


def test_non_directory_ends_a_directory_chain(tmp_path):
    l0, l1, l2 = make(tmp_path, 3)
    write(l0 / "d/bottom")
    write(l1 / "d", b"file in the middle")
    write(l2 / "d/top")
    s = LayerStack([str(l2), str(l1), str(l0)])
    assert names(s, "/d") == [b"top"]
    assert not resolve(s, "/d").merged


def test_whiteout_ends_a_directory_chain(tmp_path):
    l0, l1, l2 = make(tmp_path, 3)
    write(l0 / "d/bottom")
    whiteout(l1 / "d")
    write(l2 / "d/top")
    s = LayerStack([str(l2), str(l1), str(l0)])
    assert names(s, "/d") == [b"top"]


@pytest.mark.parametrize("how", ["trusted", "user", "fuseoverlayfs", "oci"])
def test_opaque_kinds(tmp_path, how):
    if how == "trusted" and os.geteuid() != 0:
        pytest.skip("trusted xattrs need root")
    lo, hi = make(tmp_path, 2)
    write(lo / "d/old")
    if how == "oci":
        write(hi / "d/.wh..wh..opq")
    else:
        opaque(
            hi / "d",
            {
                "trusted": "trusted.overlay.opaque",
                "user": "user.overlay.opaque",
                "fuseoverlayfs": "user.fuseoverlayfs.opaque",
            }[how],
        )
    write(hi / "d/new")
    s = LayerStack([str(hi), str(lo)])
    assert names(s, "/d") == [b"new"]
    assert s.listxattr(resolve(s, "/d")) == []


def test_opaque_x_is_not_opaque_but_enables_xattr_whiteouts(tmp_path):
    lo, hi = make(tmp_path, 2)
    write(lo / "d/gone")
    write(lo / "d/kept")
    write(hi / "d/gone")
    os.setxattr(hi / "d/gone", "user.overlay.whiteout", b"y")
    write(hi / "d/emptyfile")  # zero-size, no whiteout xattr: a real file
    os.setxattr(hi / "d", "user.overlay.opaque", b"x")
    s = LayerStack([str(hi), str(lo)])
    assert names(s, "/d") == [b"emptyfile", b"kept"]


def test_lookup_missing_and_internal_xattrs(tmp_path):
    (lo,) = make(tmp_path, 1)
    write(lo / "f")
    os.setxattr(lo / "f", "user.overlay.secret", b"1")
    os.setxattr(lo / "f", "user.visible", b"2")
    s = LayerStack([str(lo)])
    with pytest.raises(NotFound):
        resolve(s, "/missing")
    node = resolve(s, "/f")
    assert s.listxattr(node) == [b"user.visible"]
    with pytest.raises(OSError) as exc:
        s.getxattr(node, b"user.overlay.secret")
    assert exc.value.errno == errno.ENODATA


def test_lower_xattr_answers_are_kept(tmp_path):
    """A lower object's getxattr answers (a value, ENODATA) are read from its layer once;
    an upper object's every time; a failure that is not the object's (EIO) is not kept."""
    from unionfs.fsat import Roots

    class Counting(Roots):
        calls: list[bytes] = []
        fail: int | None = None

        def getxattr(self, path: bytes, name: bytes) -> bytes:
            self.calls.append(name)
            if self.fail is not None:
                raise OSError(self.fail, os.strerror(self.fail))
            return super().getxattr(path, name)

    lo, up = make(tmp_path, 2)
    write(lo / "f")
    write(up / "u")
    os.setxattr(lo / "f", "user.k", b"v")
    os.setxattr(up / "u", "user.k", b"w")
    fs = Counting()
    s = LayerStack([str(lo)], str(up), fs=fs)
    f, u = resolve(s, "/f"), resolve(s, "/u")
    fs.fail = errno.EIO
    with pytest.raises(OSError) as exc:
        s.getxattr(f, b"user.k")
    assert exc.value.errno == errno.EIO
    fs.fail = None
    for _ in range(3):
        assert s.getxattr(f, b"user.k") == b"v"
        assert s.xattr_answer(f, b"user.none") == errno.ENODATA
        assert s.getxattr(u, b"user.k") == b"w"
    assert fs.calls.count(b"user.k") == 1 + 1 + 3  # EIO, then once for f, 3 times for u
    assert fs.calls.count(b"user.none") == 1
    f.invalidate()  # what a copy-up does: the answers go with the stat
    assert s.getxattr(f, b"user.k") == b"v" and fs.calls.count(b"user.k") == 6


def test_lower_nodes_share_their_absent_xattr_answers_and_never_each_others_values(tmp_path):
    """Lower objects asked the same absent names keep one shared dict of answers (memory:
    `ls -l` asks every entry for its ACL); a later answer with a value, or another absence,
    goes into that node's answers only."""
    lo, up = make(tmp_path, 2)
    for name in "abc":
        write(lo / name)
    os.setxattr(lo / "a", "user.k", b"va")
    s = LayerStack([str(lo)], str(up))
    a, b, c = (resolve(s, n) for n in "abc")
    for node in (a, b, c):
        assert s.xattr_answer(node, b"user.none") == errno.ENODATA
    assert a.xattrs is b.xattrs is c.xattrs
    assert s.xattr_answer(a, b"user.k") == b"va"
    assert s.xattr_answer(b, b"user.k") == errno.ENODATA
    assert s.xattr_answer(c, b"user.other") == errno.ENODATA
    assert a.xattrs == {b"user.none": errno.ENODATA, b"user.k": b"va"}
    assert b.xattrs == {b"user.none": errno.ENODATA, b"user.k": errno.ENODATA}
    assert c.xattrs == {b"user.none": errno.ENODATA, b"user.other": errno.ENODATA}
    assert s.xattr_answer(c, b"user.k") == errno.ENODATA
    assert s.xattr_answer(b, b"user.other") == errno.ENODATA
    assert b.xattrs is c.xattrs and b.xattrs is not a.xattrs
    assert s.getxattr(a, b"user.k") == b"va"


@pytest.mark.parametrize("upper, index", [(True, False), (True, True), (False, False)])
def test_names_of_a_lower_hard_link(tmp_path, upper, index):
    """index=off with an upper: a node per name (copy-up will break the link), showing the
    lower file's number; index=on, or no upper: one node for every name."""
    lo, up = make(tmp_path, 2)
    write(lo / "d/g", b"g")
    os.link(lo / "d/g", lo / "g2")
    write(lo / "single", b"s")
    stack = LayerStack([str(lo)], str(up) if upper else None, index=index)
    real = os.lstat(lo / "d/g").st_ino
    g = resolve(stack, "d/g")
    stack.remember(g)
    g2 = resolve(stack, "g2")
    stack.remember(g2)
    assert stack.st_ino(g) == stack.st_ino(g2) == stack.ino_for(1 if upper else 0, real)
    assert (g is g2) == (g.ino == g2.ino) == (index or not upper)
    assert resolve(stack, "d/g").ino == g.ino  # a name keeps its node number
    one = resolve(stack, "single")
    assert stack.st_ino(one) == one.ino


def test_forget_drops_nodes(tmp_path):
    (lo,) = make(tmp_path, 1)
    write(lo / "d/f")
    s = LayerStack([str(lo)])
    d = s.lookup(s.root, b"d")
    s.remember(d, 2)
    f = s.lookup(d, b"f")
    s.remember(f)
    assert set(s.nodes) == {1, d.ino, f.ino}
    s.forget(f.ino, 1)
    s.forget(d.ino, 1)
    assert d.ino in s.nodes
    s.forget(d.ino, 1)
    assert set(s.nodes) == {1}
    s.forget(1, 5)  # the root is never forgotten
    assert 1 in s.nodes


def test_a_forgotten_directory_still_referred_to_is_found_again(tmp_path):
    """The kernel forgot a directory whose node is still a parent (of a node it holds by
    another name): a new lookup finds that same object, not a second one."""
    (lo,) = make(tmp_path, 1)
    write(lo / "d/f")
    s = LayerStack([str(lo)])
    d = s.lookup(s.root, b"d")
    s.remember(d)
    f = s.lookup(d, b"f")
    s.remember(f)
    s.forget(d.ino, 1)
    assert d.ino not in s.nodes and f.parent is d
    again = s.lookup(s.root, b"d")
    assert again is d


def test_lookup_cost_does_not_grow_with_depth(tmp_path, monkeypatch):
    """A name that lives only in the bottom layer: the real syscalls a lookup makes below a
    bottom-only directory are the same for 2 and for 200 layers."""

    def cost(depth: int) -> int:
        layers = make(tmp_path / str(depth), depth)
        write(layers[0] / "usr/lib/deep/file", b"x")
        for i, p in enumerate(layers[1:]):
            write(p / f"own{i}", b"")
        s = LayerStack([str(p) for p in reversed(layers)])
        usr = resolve(s, "/usr")
        calls = 0
        real = {n: getattr(os, n) for n in ("scandir", "lstat", "stat", "listxattr", "getxattr")}

        def counting(name):
            def f(*a, **k):
                nonlocal calls
                calls += 1
                return real[name](*a, **k)

            return f

        for n in real:
            monkeypatch.setattr(os, n, counting(n))
        node = s.lookup(s.lookup(s.lookup(usr, b"lib"), b"deep"), b"file")
        s.stat(node)
        for n, f in real.items():
            monkeypatch.setattr(os, n, f)
        return calls

    assert cost(200) == cost(2)


def test_handlers_count_lookups(tmp_path):
    """Handler tier: lookup replies are counted, forget undoes them, ENOENT is a negative entry."""
    from unionfs import fuseapi  # pyfuse3's types, or the native transport's stand-ins
    from unionfs.operations import UnionOperations

    root = 1  # FUSE_ROOT_ID

    (lo,) = make(tmp_path, 1)
    write(lo / "f", b"data")
    ops = UnionOperations(LayerStack([str(lo)]))
    # what a transport hands every handler (the descriptor budget charges opens to ctx.uid)
    ctx = types.SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)

    async def scenario():
        a = await ops.lookup(root, b"f", None)
        b = await ops.lookup(root, b"f", None)
        assert a.st_ino == b.st_ino and stat.S_ISREG(a.st_mode) and a.st_size == 4
        assert ops.stack.nodes[a.st_ino].lookups == 2
        neg = await ops.lookup(root, b"nope", None)
        assert neg.st_ino == 0
        with pytest.raises(fuseapi.FUSEError) as exc:
            await ops.getattr(123456789, None)
        assert exc.value.errno == errno.ESTALE
        fi = await ops.open(a.st_ino, os.O_RDONLY, ctx)
        assert await ops.read(fi.fh, 1, 10) == b"ata"
        await ops.release(fi.fh)
        with pytest.raises(fuseapi.FUSEError) as exc:
            await ops.open(a.st_ino, os.O_WRONLY, ctx)
        assert exc.value.errno == errno.EROFS
        await ops.forget([(a.st_ino, 2)])
        assert a.st_ino not in ops.stack.nodes

    trio.run(scenario)


def test_an_open_that_raced_the_last_name_away_never_opens_what_has_the_name_now(tmp_path):
    """The kernel looks a name up, then sends OPEN for the inode it found; an unlink or a
    rename over the name can come in between.  For an upper file, the old name then holds a
    whiteout (the open said ENXIO: a device) or another file (the open reached that file's
    data).  The open must reach the file itself, through an fd still open on it, or say
    ENOENT; a lower file's path stays valid.  The same holds for the xattr requests, which
    come without a race (fsetxattr on an fd whose file was renamed over).  Found by
    tests/test_stress.py."""
    from unionfs import fuseapi
    from unionfs.operations import UnionOperations
    from unionfs.writer import Writer

    root = 1
    (lo,) = make(tmp_path, 1)
    up, wk = tmp_path / "up", tmp_path / "wk"
    up.mkdir()
    wk.mkdir()
    write(lo / "f", b"lower f")
    write(lo / "g", b"lower g")
    stack = LayerStack([str(lo)], str(up))
    ops = UnionOperations(stack, Writer(stack, str(wk)))
    ctx = types.SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)

    async def read_all(fh: int) -> bytes:
        return bytes(await ops.read(fh, 0, 100))

    async def scenario():
        # f is copied up (an append), then whited out by unlink: ENOENT, not the whiteout
        f = await ops.lookup(root, b"f", None)
        fi = await ops.open(f.st_ino, os.O_WRONLY | os.O_APPEND, ctx)
        await ops.write(fi.fh, 7, b"+")
        await ops.release(fi.fh)
        await ops.unlink(root, b"f", ctx)
        assert os.stat(up / "f").st_rdev == 0  # the whiteout now has the name
        with pytest.raises(fuseapi.FUSEError) as exc:
            await ops.open(f.st_ino, os.O_RDONLY, ctx)
        assert exc.value.errno == errno.ENOENT
        # an upper file replaced by a rename, while an fd is open on it: the file itself
        n = await ops.create(root, b"n", 0o100644, os.O_RDWR, ctx)
        kept = n[0].fh
        await ops.write(kept, 0, b"mine")
        nino = n[1].st_ino
        await ops.rename(root, b"g", root, b"n", 0, ctx)  # g copied up, over n
        assert (up / "n").read_bytes() == b"lower g"
        again = await ops.open(nino, os.O_RDWR, ctx)
        assert await read_all(again.fh) == b"mine"
        await ops.write(again.fh, 4, b"!")
        assert (up / "n").read_bytes() == b"lower g"  # the other file is untouched
        assert await read_all(kept) == b"mine!"
        # fsetxattr and friends through the open fd: the file itself, not the new `n`
        await ops.setxattr(nino, b"user.k", b"v", ctx)
        assert await ops.getxattr(nino, b"user.k", ctx) == b"v"
        assert b"user.k" in await ops.listxattr(nino, ctx)
        assert set(os.listxattr(up / "n")) <= {"trusted.overlay.origin"}  # the copy-up's, as root
        await ops.removexattr(nino, b"user.k", ctx)
        with pytest.raises(fuseapi.FUSEError):
            await ops.getxattr(nino, b"user.k", ctx)
        for fh in (again.fh, kept):
            await ops.release(fh)
        # no fd left: gone, for every request that would have used the old name
        for call in (
            ops.open(nino, os.O_RDONLY, ctx),
            ops.setxattr(nino, b"user.k", b"v", ctx),
            ops.getxattr(nino, b"user.k", ctx),
        ):
            with pytest.raises(fuseapi.FUSEError) as exc:
                await call
            assert exc.value.errno == errno.ENOENT
        assert set(os.listxattr(up / "n")) <= {"trusted.overlay.origin"}
        # a symlink renamed over: never the target of the symlink that has its name now
        await ops.symlink(root, b"s", b"first", ctx)
        s1 = await ops.lookup(root, b"s", None)
        await ops.symlink(root, b"s2", b"second", ctx)
        await ops.rename(root, b"s2", root, b"s", 0, ctx)
        with pytest.raises(fuseapi.FUSEError) as exc:
            await ops.readlink(s1.st_ino, ctx)
        assert exc.value.errno == errno.ENOENT

    trio.run(scenario)


@pytest.mark.parametrize("copy_first", [True, False])
def test_a_lower_name_its_copy_is_not_linked_at_stays_a_file_of_its_own(tmp_path, copy_first):
    """index=on: an upper copy of a hard-linked lower file takes the lower file's number (by
    its stored origin).  A name of that lower file where the copy is not linked (the kernel
    keeps such links in its own index; or a name the writer missed) still shows the lower
    file: in either lookup order a node of its own, with the lower path.  Taken for the copy
    under another name, it was sent to an upper path that does not exist (a stress run's
    remount listed nothing in a directory holding such a name).  Root: origins."""
    from tests.mounts import require_root
    from unionfs import fsat, origin

    require_root()
    lo, up = make(tmp_path, 2)
    write(lo / "a/f", b"lower\n")
    write(lo / "b/keep", b"")
    os.link(lo / "a/f", lo / "b/g")
    write(up / "a/f", b"the copy\n")
    fs = fsat.Roots(strict=False)
    value = origin.value_for(fs, os.fsencode(lo / "a/f"), os.lstat(lo / "a/f"), {})
    assert value is not None
    os.setxattr(up / "a/f", origin.XATTR, value)
    stack = LayerStack([str(lo)], str(up), index=True)
    order = ["a/f", "b/g"] if copy_first else ["b/g", "a/f"]
    nodes = {}
    for path in order:
        nodes[path] = resolve(stack, path)
        stack.remember(nodes[path])
    copy, name = nodes["a/f"], nodes["b/g"]
    assert copy is not name and copy.ino != name.ino
    assert stack.in_upper(copy) and not stack.in_upper(name)
    assert stack.real_path(name) == os.fsencode(lo / "b/g")
    assert stack.stat(name).st_ino == os.lstat(lo / "b/g").st_ino
    assert stack.real_path(copy) == os.fsencode(up / "a/f") and copy.parent.name == b"a"
    assert resolve(stack, "b/g") is name  # found again by its own number


# ----- a lookup before the listing: the probe gives what the listing would ----------------
_PROBE_NAMES = [b"a", b".wh.a", b".wh..wh..opq", b"zz"]
# "absent" weighs most: a name whited out or hidden matters only where no layer between has it
_PROBE_KINDS = ["absent"] * 5 + ["file", "dir", "symlink", "whiteout", "xwhiteout", "emptyfile"]


def _probe_layers(draw_kinds, root: Path, layers: int, upper: bool) -> list[Path]:
    """Layers top-first (the first the upper when `upper`), each with a directory `d` whose
    names take the drawn kinds; `d` itself may be opaque, enable xattr whiteouts, or be a
    file instead."""
    paths = []
    for i in range(layers):
        layer = root / f"l{i}"
        layer.mkdir()
        d_kind, names = draw_kinds[i]
        if d_kind == "file":
            write(layer / "d", b"not a dir")
        elif d_kind != "absent":
            (layer / "d").mkdir()
            if d_kind in ("opaque", "x"):
                os.setxattr(
                    layer / "d", "user.overlay.opaque", b"y" if d_kind == "opaque" else b"x"
                )
            for name, kind in zip(_PROBE_NAMES, names, strict=True):
                at = layer / "d" / os.fsdecode(name)
                if kind == "file":
                    write(at, b"data")
                elif kind == "emptyfile":
                    write(at)
                elif kind == "dir":
                    at.mkdir()
                elif kind == "symlink":
                    os.symlink("a", at)
                elif kind == "whiteout":
                    whiteout(at)
                elif kind == "xwhiteout":
                    write(at)
                    os.setxattr(at, "user.overlay.whiteout", b"y")
        paths.append(layer)
    return paths


def _entry_fields(entry):
    if entry is None:
        return None
    dirs = [(d.layer, d.path, d.ino) for d in entry.dirs] if entry.dirs is not None else None
    return (entry.kind, entry.layer, entry.path, entry.ino, dirs, entry.covers)


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are character devices: root")
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    layers=st.integers(2, 4),
    upper=st.booleans(),
    kinds=st.lists(
        st.tuples(
            st.sampled_from(["dir"] * 4 + ["opaque", "x", "absent", "file"]),
            st.lists(st.sampled_from(_PROBE_KINDS), min_size=4, max_size=4),
        ),
        min_size=4,
        max_size=4,
    ),
)
def test_a_name_probed_before_its_directory_is_listed_is_what_the_listing_says(
    tmp_path_factory, layers, upper, kinds
):
    """`LayerStack._probe` (a lookup's lstat of one name in each layer) gives the entry the
    directory's listing (`_merge`) gives that name: whiteouts of both formats, OCI markers
    (which count in lower layers only), opaque directories and xattr whiteouts, names in
    one layer or many, for names there and not there."""
    root = tmp_path_factory.mktemp("probe")
    paths = _probe_layers(kinds, root, layers, upper)
    top, rest = (
        (str(paths[0]), [str(p) for p in paths[1:]]) if upper else (None, [str(p) for p in paths])
    )
    names = [b"d", *_PROBE_NAMES]
    for parent_path in (b"", b"d"):
        stack = LayerStack(rest, top)
        parent = stack.root
        if parent_path:  # reached through the root's listing, as before probes
            found = stack.listing(stack.root).get(parent_path)
            if found is None or found.dirs is None:
                continue
            parent = stack.node_for(stack.root, parent_path, found)
        probed = {name: _entry_fields(stack._probe(parent, name)) for name in names}
        listed = stack._merge(stack.dir_paths(parent))
        assert probed == {name: _entry_fields(listed.get(name)) for name in names}


def test_the_first_names_looked_up_in_a_directory_do_not_list_it(tmp_path):
    """A lookup probes the directory's layers for the name; only once PROBES names (found
    or not) were looked up there is it listed, and the nodes found before stay the nodes
    its listing gives: a later lookup, a copy-up's bookkeeping and a removal see them."""
    from unionfs.fsat import Roots
    from unionfs.stack import PROBES

    class Counting(Roots):
        scans: list[bytes] = []

        def scandir_str(self, path: bytes):  # type: ignore[override]
            self.scans.append(path)
            return super().scandir_str(path)

    lo, up = make(tmp_path, 2)
    for i in range(PROBES + 2):
        write(lo / f"d/f{i}", b"%d" % i)
    fs = Counting()
    s = LayerStack([str(lo)], str(up), fs=fs)
    d = s.lookup(s.root, b"d")
    s.remember(d)
    first = s.lookup(d, b"f0")
    s.remember(first)
    assert s.find(d, b"nope") is None
    for i in range(1, PROBES - 1):
        s.remember(s.lookup(d, b"f%d" % i))
    assert fs.scans == [] and d.listing is None
    s.remember(s.lookup(d, b"f%d" % (PROBES - 1)))  # the next name lists the directory
    assert fs.scans == [os.fsencode(lo / "d")]
    assert s.listing(d)[b"f0"].node_ino == first.ino
    assert s.lookup(d, b"f0") is first

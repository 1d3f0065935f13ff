"""Hard links against kernel overlayfs, with `index=off` (the default) and `index=on`.

The same steps run on layerfs and on the kernel, over copies of the same layers; after every
step the outcome (value or errno, fstat of open files included) and the visible tree must
agree: contents, modes, st_nlink, and which names are one inode.  Then each side is remounted
on its own upper (same index mode) and compared again, and the kernel mounts layerfs's upper
and must show the very tree layerfs shows after its remount.

The layers have hard links in one directory, across directories, across layers (one inode
in two layer directories), with one name whited out above, and with three names.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagestore.changeset import write_changeset
from tests import layerdata, ops, treecmp
from tests.mounts import KernelOverlay, LayerfsMount, require_fuse, require_root
from tests.test_differential import tree_diff

pytestmark = pytest.mark.mount


def build_lowers(root: Path) -> list[Path]:
    """Two layers (returned top-first) in one directory, so one `cp -a` keeps every link."""
    l0, l1 = root / "l0", root / "l1"
    layerdata.write(l0 / "a/g", b"g\n")
    os.link(l0 / "a/g", l0 / "a/g2")  # one directory
    layerdata.write(l0 / "a/x", b"x\n", mode=0o600)
    (l0 / "b").mkdir()
    os.link(l0 / "a/x", l0 / "b/x2")  # two directories
    layerdata.write(l0 / "a/p", b"p\n")
    (l1 / "a").mkdir(parents=True)
    os.link(l0 / "a/p", l1 / "a/q")  # across layers: one inode in two layer directories
    layerdata.write(l0 / "a/w", b"w\n")
    os.link(l0 / "a/w", l0 / "a/w2")
    layerdata.whiteout(l1 / "a/w2")  # one name whited out above
    layerdata.write(l0 / "a/t", b"t\n", mode=0o755)
    os.link(l0 / "a/t", l0 / "a/t2")
    os.link(l0 / "a/t", l0 / "b/t3")  # three names
    for d in (l0, l1):
        layerdata._fix_dir_times(d)
    return [l1, l0]


W, A, WSTAT, CHMOD, TRUNC, LINK, UNLINK, RENAME, GONE = (
    "write",
    "append_fstat",
    "append",
    "chmod",
    "truncate",
    "link",
    "unlink",
    "rename",
    "unlink_open",
)

SEQUENCES = {
    "chmod-each": [
        (CHMOD, "a/g", 0o600),
        (CHMOD, "a/x", 0o640),
        (CHMOD, "a/q", 0o600),
        (CHMOD, "a/w", 0o600),
        (CHMOD, "b/t3", 0o700),
        (CHMOD, "a/g2", 0o604),
    ],
    "write-each": [
        (A, "a/g2", b"more\n"),
        (W, "b/x2", b"new x\n"),
        (A, "a/p", b"+p\n"),
        (TRUNC, "a/w", 1),
        (WSTAT, "a/t2", b"t2\n"),
        (A, "a/g", b"again\n"),
        (WSTAT, "b/t3", b"t3\n"),
    ],
    "link-unlink": [
        (LINK, "a/t", "a/new"),
        (UNLINK, "a/t2"),
        (GONE, "b/t3", ["b/t3"]),
        (LINK, "a/g", "b/g3"),
        (UNLINK, "a/g"),
        (LINK, "a/w", "b/w3"),
        (UNLINK, "a/q"),
    ],
    "unlink-open": [
        (GONE, "a/g2", ["a/g2", "a/g"]),
        (CHMOD, "a/x", 0o644),
        (GONE, "a/x", ["a/x", "b/x2"]),
        (GONE, "a/w", ["a/w"]),
        (GONE, "a/t", ["a/t2", "a/t"]),
    ],
    "rename": [
        (RENAME, "a/g", "b/g"),
        (RENAME, "b/x2", "a/g2"),
        (RENAME, "a/t", "a/p"),
        (CHMOD, "a/q", 0o600),
        (A, "b/t3", b"t3\n"),
    ],
}


def apply(root: Path, step: tuple) -> tuple:
    op, path, arg = step[0], step[1], step[2] if len(step) > 2 else None
    if op == W:
        return ops.outcome(ops.write, root, path, arg, "w")
    if op == A:
        return ops.outcome(ops.write, root, path, arg, "a")
    if op == WSTAT:
        return ops.outcome(ops.write_fstat, root, path, arg)
    if op == CHMOD:
        return ops.outcome(ops.chmod, root, path, arg)
    if op == TRUNC:
        return ops.outcome(ops.truncate, root, path, arg)
    if op == LINK:
        return ops.outcome(ops.link, root, path, arg)
    if op == UNLINK:
        return ops.outcome(ops.unlink, root, path)
    if op == RENAME:
        return ops.outcome(ops.rename, root, path, arg, 0)
    assert op == GONE
    return ops.outcome(ops.unlink_open, root, path, arg)


def compare(ours: dict, theirs: dict, what: str) -> None:
    problems = tree_diff(ours, theirs) + treecmp.link_group_problems(ours, theirs)
    assert problems == [], f"{what}:\n" + "\n".join(problems[:40])
    assert treecmp.inode_problems(ours) == []


@pytest.fixture(scope="module")
def lowers(tmp_path_factory):
    require_root()
    require_fuse()
    root = tmp_path_factory.mktemp("hardlinks")
    return build_lowers(root / "lowers")


def side(base: Path, name: str, lowers: list[Path]) -> tuple[Path, list[Path]]:
    d = base / name
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir(parents=True)
    subprocess.run(["cp", "-a", str(lowers[0].parent), str(d / "lowers")], check=True)
    return d, [d / "lowers" / low.name for low in lowers]


@pytest.mark.parametrize("seq", sorted(SEQUENCES))
@pytest.mark.parametrize("index", ["off", "on"])
def test_hard_links_like_the_kernel(tmp_path, lowers, index, seq):
    opts = f"index={index}"
    ours, our_lowers = side(tmp_path, "layerfs", lowers)
    theirs, their_lowers = side(tmp_path, "kernel", lowers)
    with (
        LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work", opts),
        KernelOverlay(theirs / "mnt", their_lowers, theirs / "upper", theirs / "work", opts),
    ):
        compare(treecmp.snapshot(ours / "mnt"), treecmp.snapshot(theirs / "mnt"), "at start")
        for step in SEQUENCES[seq]:
            got = {who: apply(d / "mnt", step) for who, d in (("ours", ours), ("theirs", theirs))}
            assert got["ours"] == got["theirs"], f"{step}: {got}"
            compare(
                treecmp.snapshot(ours / "mnt"), treecmp.snapshot(theirs / "mnt"), f"after {step}"
            )
    # each side remounted on its own upper
    with (
        LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work", opts),
        KernelOverlay(theirs / "mnt", their_lowers, theirs / "upper", theirs / "work", opts),
    ):
        again = treecmp.snapshot(ours / "mnt")
        compare(again, treecmp.snapshot(theirs / "mnt"), "after remount")
    # the kernel reads layerfs's upper as layerfs does
    (ours / "kwork").mkdir()
    with KernelOverlay(ours / "mnt", our_lowers, ours / "upper", ours / "kwork", opts):
        compare(again, treecmp.snapshot(ours / "mnt"), "kernel on layerfs's upper")


def test_index_off_breaks_the_link_on_copy_up(tmp_path, lowers):
    """The issue's own case, spelled out: chmod of one name leaves the other name alone."""
    ours, our_lowers = side(tmp_path, "layerfs", lowers)
    with LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work"):
        g, g2 = ours / "mnt/a/g", ours / "mnt/a/g2"
        assert os.lstat(g).st_ino == os.lstat(g2).st_ino and os.lstat(g).st_nlink == 2
        os.chmod(g, 0o600)
        sg, sg2 = os.lstat(g), os.lstat(g2)
        assert (sg.st_nlink, sg.st_mode & 0o777) == (1, 0o600)
        assert (sg2.st_nlink, sg2.st_mode & 0o777) == (2, 0o644)
        assert sg.st_ino != sg2.st_ino
        with open(g, "ab") as f:
            f.write(b"only g\n")
            assert os.fstat(f.fileno()).st_ino == sg.st_ino
        assert g2.read_bytes() == b"g\n" and g.read_bytes() == b"g\nonly g\n"
        names = {e.name: e.inode() for e in os.scandir(ours / "mnt/a")}
        assert names["g"] == sg.st_ino and names["g2"] == sg2.st_ino
    assert os.lstat(ours / "upper/a/g").st_nlink == 1
    assert not os.path.lexists(ours / "upper/a/g2")


@pytest.mark.parametrize("index", ["off", "on"])
def test_commit_writes_links_only_between_one_inode(tmp_path, lowers, index):
    """The changeset of each mode, applied over the same lowers, shows what the mount showed:
    with index=off a name copied up is its own file (no tar link to the name left below),
    with index=on the names are tar links of one file."""
    ours, our_lowers = side(tmp_path, "layerfs", lowers)
    with LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work", f"index={index}"):
        m = ours / "mnt"
        os.chmod(m / "a/g", 0o600)
        ops.write(m, "b/x2", b"new x\n", "a")
        os.link(m / "a/t", m / "a/new")
        view = treecmp.snapshot(m)
    buf = io.BytesIO()
    write_changeset(ours / "upper", list(reversed(our_lowers)), buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        by = {t.name: t for t in tar.getmembers()}
        (tmp_path / "new").mkdir()
        # OCI `.wh.` files: layerfs reads them.  Extraction filters came in 3.11.4 (not in
        # Debian 12's 3.11.2); where they exist, say which one to keep 3.14's default away
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(tmp_path / "new", **trusted)
    if index == "off":
        assert by["a/g"].isfile() and "a/g2" not in by
        assert by["b/x2"].isfile() and "a/x" not in by
        assert by["a/t"].islnk() and by["a/t"].linkname == "a/new"  # both made in the upper
        assert not any(by[n].islnk() for n in ("a/g", "b/x2", "a/new"))
    else:
        groups: dict[str, set[str]] = {}
        for n, t in by.items():
            if t.islnk():
                groups.setdefault(t.linkname, {t.linkname}).add(n)
        assert sorted(map(sorted, groups.values())) == [
            ["a/g", "a/g2"],
            ["a/new", "a/t", "a/t2", "b/t3"],
            ["a/x", "b/x2"],
        ], groups
    (tmp_path / "view").mkdir()
    with LayerfsMount(tmp_path / "view", [tmp_path / "new", *lowers]):
        compare(treecmp.snapshot(tmp_path / "view"), view, "the committed layer over the lowers")


def test_index_on_links_a_name_shown_through_a_directory_the_kernel_forgot(tmp_path, lowers):
    """A directory holding names of lower hard links moves (a redirect), the kernel forgets
    its inodes, then another name of each is written: the moved names must show the copy,
    as on the kernel (which finds the copy through its index).  layerfs links the copy at
    every name it finds shown; it looked for moved names among the nodes the kernel held."""
    opts = "index=on,redirect_dir=on"
    ours, our_lowers = side(tmp_path, "layerfs", lowers)
    theirs, their_lowers = side(tmp_path, "kernel", lowers)
    with (
        LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work", opts),
        KernelOverlay(theirs / "mnt", their_lowers, theirs / "upper", theirs / "work", opts),
    ):
        for step in [(RENAME, "b", "a/c"), ("drop",), (A, "a/x", b"+x\n"), (CHMOD, "a/t", 0o700)]:
            if step[0] == "drop":
                Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets
                continue
            got = {who: apply(d / "mnt", step) for who, d in (("ours", ours), ("theirs", theirs))}
            assert got["ours"] == got["theirs"], f"{step}: {got}"
        assert (ours / "mnt/a/c/x2").read_bytes() == b"x\n+x\n"
        compare(treecmp.snapshot(ours / "mnt"), treecmp.snapshot(theirs / "mnt"), "after")
    # the link count as the kernel reads it for an upper copy of a lower hard link (its own
    # copy-up writes one too; without it the kernel logs "failed to get index nlink")
    for copied in ("a/x", "a/t"):
        assert os.getxattr(ours / "upper" / copied, "trusted.overlay.nlink") == b"U+0"
    with LayerfsMount(ours / "mnt", our_lowers, ours / "upper", ours / "work", opts):
        again = treecmp.snapshot(ours / "mnt")
    (ours / "kwork").mkdir()
    with KernelOverlay(ours / "mnt", our_lowers, ours / "upper", ours / "kwork", opts):
        compare(again, treecmp.snapshot(ours / "mnt"), "kernel on layerfs's upper")


@pytest.mark.parametrize("how", ["rename", "append", "chmod"])
def test_index_off_copy_up_shows_the_broken_link_at_once(tmp_path, how):
    """A copy-up that breaks a hard link (index=off) changes the name's st_ino and st_nlink
    behind the kernel's back.  After a rename the kernel drops only the file's cached
    ctime, so a statx that asks for the number and link count alone (`stat -c '%i %h'`)
    was answered from its cache: the old number, nlink 2, until the cache went (found while
    tracing unionmount-testsuite's rename-mass-5).  The daemon now tells the kernel to drop
    the file's attributes when a copy-up breaks the link.  Each answer must be the
    kernel's overlayfs's."""
    require_root()
    seen = {}
    for who in ("layerfs", "kernel"):
        d = tmp_path / who
        layerdata.write(d / "lower/a/g", b"g\n")
        os.link(d / "lower/a/g", d / "lower/a/g2")
        for sub in ("upper", "work", "mnt"):
            (d / sub).mkdir()
        mount = (LayerfsMount if who == "layerfs" else KernelOverlay)(
            d / "mnt", [d / "lower"], d / "upper", d / "work"
        )
        with mount:
            mnt = d / "mnt"

            def ino_nlink(path: Path) -> tuple[int, int]:
                out = subprocess.run(["stat", "-c", "%i %h", str(path)], capture_output=True,
                                     text=True, check=True).stdout.split()  # fmt: skip
                return int(out[0]), int(out[1])

            before, before2 = ino_nlink(mnt / "a/g"), ino_nlink(mnt / "a/g2")  # now cached
            name = mnt / "a/g"
            if how == "rename":
                os.rename(mnt / "a/g", mnt / "a/moved")
                name = mnt / "a/moved"
            elif how == "append":
                with open(name, "ab") as f:
                    f.write(b"more\n")
            else:
                os.chmod(name, 0o600)
            (ino, nlink), (ino2, nlink2) = ino_nlink(name), ino_nlink(mnt / "a/g2")
            seen[who] = (before[0] == before2[0], nlink, nlink2, ino == ino2, ino == before[0])
    assert seen["layerfs"] == seen["kernel"] == (True, 1, 2, False, False)


def _two_sides(tmp_path: Path):
    """(who, dir, Mount class) for layerfs and the kernel, each with lower/upper/work/mnt."""
    require_root()
    sides = []
    for who, cls in (("layerfs", LayerfsMount), ("kernel", KernelOverlay)):
        d = tmp_path / who
        for sub in ("lower", "upper", "work", "mnt"):
            (d / sub).mkdir(parents=True)
        sides.append((who, d, cls))
    return sides


def _mount(d: Path, cls, opts: str):  # type: ignore[no-untyped-def]
    return cls(d / "mnt", [d / "lower"], d / "upper", d / "work", opts)


def _ino_nlink(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_nlink


def test_a_copy_made_before_the_lower_file_was_linked_stays_its_own_file(tmp_path):
    """xfstests overlay/042: a file copied up with index=off (one lower link then), then more
    names of that lower file made below and one of them copied up with index=on.  Both
    upper files record the same origin.  layerfs took them for one inode: a write to the
    first name went into the other's file.  As on the kernel, the names copied with
    index=on show the lower file's number and count, the older copy its own; each write
    lands in its own file, whichever name is looked up first."""
    seen = {}
    for who, d, cls in _two_sides(tmp_path):
        layerdata.write(d / "lower/0", b"")
        with _mount(d, cls, "index=off"):
            os.link(d / "mnt/0", d / "mnt/1")
        os.link(d / "lower/0", d / "lower/2")
        os.link(d / "lower/0", d / "lower/3")
        with _mount(d, cls, "index=on"):
            os.link(d / "mnt/2", d / "mnt/4")
        with _mount(d, cls, "index=on"):  # the older copy's name first
            (d / "mnt/0").write_bytes(b"zero\n")
            first = {n: _ino_nlink(d / "mnt" / n) for n in "01234"}
        with _mount(d, cls, "index=on"):  # the newer copy's names first
            (d / "mnt/2").write_bytes(b"two\n")
            second = {n: _ino_nlink(d / "mnt" / n) for n in "43210"}
            contents = {n: (d / "mnt" / n).read_bytes() for n in "01234"}
        lower_ino = os.lstat(d / "lower/0").st_ino
        shape = []
        for got in (first, second):
            groups = sorted(
                sorted(n for n in got if got[n][0] == ino) for ino in {v[0] for v in got.values()}
            )
            shape.append((groups, {n: got[n][1] for n in sorted(got)}))
        seen[who] = (shape, contents, (d / "upper/0").read_bytes(), (d / "upper/2").read_bytes())
        if who == "kernel":
            assert first["2"][0] == lower_ino  # the kernel shows the indexed copy as the lower file
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"][1] == {
        "0": b"zero\n",
        "1": b"zero\n",
        "2": b"two\n",
        "3": b"two\n",
        "4": b"two\n",
    }


def test_an_upper_directory_copied_by_hand_with_its_redirect_is_a_directory_of_its_own(tmp_path):
    """xfstests overlay/049: a lower directory moved (a redirect to its origin), then copied
    in the upper with `cp -a` (the copy keeps the redirect and the origin) and each copy
    given a file of its own.  layerfs took both for one directory: listing one showed the
    other's entries.  The kernel refuses the copy (ESTALE: two redirects to one origin);
    layerfs shows each with its own entries and its own inode number, as two upper
    directories."""
    (d,) = [d for who, d, _ in _two_sides(tmp_path) if who == "layerfs"]
    layerdata.write(d / "lower/origin/file", b"lower\n")
    with _mount(d, LayerfsMount, "redirect_dir=on"):
        (d / "mnt/origin/file").touch()
        os.rename(d / "mnt/origin", d / "mnt/r1")
    subprocess.run(["cp", "-a", str(d / "upper/r1"), str(d / "upper/r2")], check=True)
    (d / "upper/r1/right").touch()
    (d / "upper/r2/wrong").touch()
    with _mount(d, LayerfsMount, "redirect_dir=on"):
        mnt = d / "mnt"
        for first, second in (("r2", "r1"), ("r1", "r2")):
            listed = {n: sorted(os.listdir(mnt / n)) for n in (first, second)}
            assert listed == {"r1": ["file", "right"], "r2": ["file", "wrong"]}
        assert os.lstat(mnt / "r1").st_ino != os.lstat(mnt / "r2").st_ino
        assert os.lstat(mnt / "r1/file").st_ino != os.lstat(mnt / "r2/file").st_ino
        (mnt / "r2/file").write_bytes(b"r2\n")
        assert (d / "upper/r2/file").read_bytes() == b"r2\n"
        assert (d / "upper/r1/file").read_bytes() != b"r2\n"


def test_a_name_linked_at_copy_up_lists_the_number_stat_shows(tmp_path):
    """xfstests overlay/044: with index=on, writing one name of a lower hard link links the
    copy at the other names too; the listing's entry of another name kept the lower file's
    number as if it were its real upper inode, so readdir gave that name a number of its
    own (its d_ino differed from its st_ino).  As on the kernel, every name lists the
    number stat shows."""
    seen = {}
    fs = tmp_path / "lowerfs"  # the lower on a filesystem of its own, as in the xfstests run
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "layertest", str(fs)], check=True, timeout=30)
    try:
        for who, d, cls in _two_sides(tmp_path):
            lower = fs / who
            layerdata.write(lower / "foo", b"zero\n")
            os.link(lower / "foo", lower / "bar")
            with cls(d / "mnt", [lower], d / "upper", d / "work", "index=on,xino=on"):
                before = {n: os.lstat(d / "mnt" / n).st_ino for n in ("foo", "bar")}  # lookups
                with open(d / "mnt/bar", "ab") as f:
                    f.write(b"one\n")
                after = {n: os.lstat(d / "mnt" / n).st_ino for n in ("foo", "bar")}
                listed = {e.name: e.inode() for e in os.scandir(d / "mnt")}
            seen[who] = (before == after == listed, len(set(listed.values())))
    finally:
        subprocess.run(["umount", "-l", str(fs)], timeout=30)
    assert seen["layerfs"] == seen["kernel"] == (True, 1)


def test_index_on_refuses_an_upper_made_over_other_lower_layers(tmp_path):
    """xfstests overlay/037: with index=on the upper's root records the topmost lower
    layer's root (its origin); the kernel refuses to mount that upper over other lower
    layers (ESTALE), since its copies and links stand for lower files that are not there,
    and so does layerfs now.  Each engine also mounts the other's upper over the same
    layers, so the root's origin is the same bytes."""
    require_root()
    outcome = {}
    for who in ("layerfs", "kernel"):
        d = tmp_path / who
        for sub in ("l1", "l2", "other", "upper", "work", "kwork", "lwork", "mnt"):
            (d / sub).mkdir(parents=True)
        layerdata.write(d / "l1/f", b"f\n")
        first = LayerfsMount if who == "layerfs" else KernelOverlay
        other = KernelOverlay if who == "layerfs" else LayerfsMount
        with first(d / "mnt", [d / "l1", d / "l2"], d / "upper", d / "work", "index=on"):
            (d / "mnt/f").write_bytes(b"changed\n")
        got = []
        for cls, lowers, work in (
            (first, [d / "other", d / "l2"], d / "work"),  # another topmost lower layer
            (first, [d / "l1", d / "l2"], d / "work"),  # the same layers again
            (other, [d / "l1", d / "l2"], d / ("kwork" if who == "layerfs" else "lwork")),
        ):
            try:
                with cls(d / "mnt", lowers, d / "upper", work, "index=on"):
                    got.append((d / "mnt/f").read_bytes())
            except (Exception, pytest.fail.Exception):  # the mount was refused
                got.append(None)
        outcome[who] = got
    assert outcome["layerfs"] == outcome["kernel"] == [None, b"changed\n", b"changed\n"]

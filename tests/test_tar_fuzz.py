"""Hypothesis against tarsafe and tarapply: random layer tars of hostile shape.

Entries are drawn from names that matter (`..`, absolute paths, `.wh.` markers, the opaque
marker, AUFS metadata, repeated names) and every entry type; each tar is applied in both
formats.  Properties: the only failure is CorruptLayer; nothing outside the layer root is
touched (a sibling directory and a symlink pointing at it stay as they were); tarsafe's paths
never hold an empty, `.` or `..` component.
"""

from __future__ import annotations

import io
import os
import tarfile
import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imagestore import tarapply, tarsafe
from imagestore.errors import CorruptLayer
from imagestore.tarapply import LayerWriter

COMPONENTS = ["a", "b", "..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh..wh.plnk", "out"]
names = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map("/".join)
prefixes = st.sampled_from(["", "/", "./", "../"])
KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
entries = st.lists(
    st.tuples(prefixes, names, st.sampled_from(KINDS), names, st.binary(max_size=16)),
    max_size=12,
)
SETTINGS = settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _tar(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for prefix, name, kind, link, data in items:
            info = tarfile.TarInfo(prefix + name)
            info.type, info.mode = kind, 0o755
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link if kind == tarfile.LNKTYPE else "../../outside/" + link
            tf.addfile(info)
    return buf.getvalue()


def _state(path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        for n in sorted(dirs + files):
            st = os.lstat(os.path.join(dirpath, n))
            out.append((os.path.relpath(os.path.join(dirpath, n), path), st.st_mode, st.st_size))
    return sorted(out)


@SETTINGS
@given(items=entries, fmt=st.sampled_from([tarapply.OVERLAY, tarapply.PLAIN]))
def test_any_tar_is_applied_inside_the_root_or_refused(tmp_path_factory, items, fmt):
    base = tmp_path_factory.mktemp("fuzz")
    outside, root = base / "outside", base / "root"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    root.mkdir()
    os.symlink("../outside", root / "out")  # a trap: writing through it would escape
    before = _state(outside)
    _apply_tar(root, items, fmt)
    assert _state(outside) == before


def _apply_tar(root, items, fmt: str, workers: int = 0) -> str:
    """Apply the tar of `items` to `root`; "ok" or the CorruptLayer's words."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    writer = LayerWriter(fd, fmt, workers=workers)
    try:
        with tarfile.open(
            fileobj=io.BytesIO(_tar(items)), mode="r|", tarinfo=tarsafe.SafeTarInfo
        ) as tar:
            for member in tar:
                writer.apply(member, tar)
        writer.finish()
    except CorruptLayer as exc:
        return f"CorruptLayer: {exc}"
    finally:
        writer.close()
        os.close(fd)
    return "ok"


@SETTINGS
@given(prefix=prefixes, name=names)
def test_split_path_is_normalised_or_refused(prefix, name):
    try:
        parts = tarsafe.split_path(prefix + name, "entry")
    except CorruptLayer:
        return
    assert all(p not in (b"", b".", b"..") and b"/" not in p for p in parts)
    assert tarsafe.split_path(os.fsdecode(b"/".join(parts)), "entry") == parts  # idempotent


def _split_reference(name: str) -> list[bytes] | None:
    """split_path's rules, one component at a time (None: refused)."""
    raw = os.fsencode(name)
    if len(raw) > tarsafe.MAX_PATH_BYTES:
        return None
    parts: list[bytes] = []
    for comp in raw.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                return None
            parts.pop()
        elif len(comp) > tarsafe.MAX_NAME_BYTES or b"\0" in comp:
            return None
        else:
            parts.append(comp)
    return parts


odd_components = st.sampled_from(["", ".", "..", "a", "b\0c", "é", "x" * 255, "y" * 256])


@SETTINGS
@given(prefix=prefixes, name=names | st.lists(odd_components, max_size=6).map("/".join))
@example(prefix="", name="a/" + "y" * 256)
@example(prefix="", name="a/b\0c")
@example(prefix="./", name="x" * 255)
def test_split_path_agrees_with_its_rules(prefix, name):
    """The fast path for usual names and the component loop give the same answer."""
    try:
        got = tarsafe.split_path(prefix + name, "entry")
    except CorruptLayer:
        got = None
    assert got == _split_reference(prefix + name)


def _apply_with(base, items, workers: int) -> tuple[str, list]:
    root = base / f"w{workers}"
    root.mkdir()
    outcome = _apply_tar(root, items, tarapply.OVERLAY, workers)
    tree = []
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            body = open(p, "rb").read() if os.path.isfile(p) and not os.path.islink(p) else None
            tree.append((os.path.relpath(p, root), st_.st_mode, st_.st_rdev, body))
    return outcome, sorted(tree)


@SETTINGS
@given(items=entries.map(lambda xs: xs * 2))  # every path at least twice: replacements
@example(items=[("", "a", tarfile.REGTYPE, "", b"x"), ("", ".wh.a", tarfile.REGTYPE, "", b"")])
@example(items=[("", "a", tarfile.REGTYPE, "", b"x"), ("", "b", tarfile.LNKTYPE, "a", b"")])
@example(items=[("", "a/b", tarfile.REGTYPE, "", b"x"), ("", "a", tarfile.REGTYPE, "", b"y")])
def test_files_made_by_workers_give_the_same_layer(tmp_path_factory, items):
    """tarapply's filepool (small files created in threads) keeps the order's effects:
    the same tree, or the same error, as one file after the other."""
    base = tmp_path_factory.mktemp("pool")
    slow = tarapply.LayerWriter._small_file

    def late(self, *args):  # a worker that is late: later entries find its file pending
        time.sleep(0.002)
        return slow(self, *args)

    tarapply.LayerWriter._small_file = late  # type: ignore[method-assign]
    try:
        pooled = _apply_with(base, items, 4)
    finally:
        tarapply.LayerWriter._small_file = slow  # type: ignore[method-assign]
    assert pooled == _apply_with(base, items, 0)

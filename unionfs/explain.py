"""explain: why a path of a union looks the way it does (`layer which`).

    explain(stack, path) -> Explanation

The answer — what the path resolves to, from which layer, and which layers make up a merged
directory — is the daemon's own: `resolve` walks the path with `LayerStack.lookup`, the very
method the mount's LOOKUP handler calls, so it cannot disagree with the mount.  `resolve` is
the only place that asks the stack; to answer from another rules module, re-point it.
Around that answer, the explanation reads what each layer holds at the path (plain lstat and
the `markers` encodings) to say what the answer hides and which marker decided it:
  - `hides`: every layer below the winner that has an object at the same path and is not
    part of the winner (a merged directory's own layers are not hidden);
  - `decided_by`: the whiteout that removes the name, each opaque directory (the path or
    an ancestor) that cuts lower layers off, the upper's redirect of a moved directory, or
    the non-directory that hides everything below it;
  - `entries_from`: for a directory, the layers whose entries its listing shows.
Layers are numbered as in `LayerStack.layers`: top first, 0 is the upper when there is one.
Pure and synchronous; reads only.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from . import markers
from .errors import NotADirectory, NotFound
from .fsutil import kind_name
from .stack import LayerStack, Node


@dataclass
class Resolved:
    """What the stack says: the node (None when the name does not exist), the directory
    nodes walked through (root first) and, for a missing name, where the walk stopped."""

    node: Node | None
    ancestors: list[Node]
    stopped_at: bytes = b""  # the first component the stack did not find


def resolve(stack: LayerStack, path: bytes) -> Resolved:
    """Walk `path` with the daemon's lookup (the one use of LayerStack's rules here)."""
    node = stack.root
    ancestors: list[Node] = []
    for comp in [c for c in path.split(b"/") if c]:
        ancestors.append(node)
        try:
            node = stack.lookup(node, comp)
        except (NotFound, NotADirectory):
            return Resolved(None, ancestors, comp)
    return Resolved(node, ancestors)


@dataclass
class Version:
    layer: int
    kind: str  # file, directory, symlink, whiteout, ...


@dataclass
class Reason:
    rule: str  # whiteout | opaque | redirect | non-directory
    layer: int
    path: str
    detail: str = ""


@dataclass
class Explanation:
    path: str
    present: bool
    kind: str = ""
    layer: int | None = None  # the layer whose object is shown (a directory: its top one)
    layers: list[int] = field(default_factory=list)  # a directory: every layer merged in
    hides: list[Version] = field(default_factory=list)
    decided_by: list[Reason] = field(default_factory=list)
    entries_from: dict[int, int] = field(default_factory=dict)  # layer → entries shown


def explain(stack: LayerStack, path: str) -> Explanation:
    rel = os.fsencode(path).strip(b"/")
    shown_path = "/" + os.fsdecode(rel)
    res = resolve(stack, rel)
    found = _per_layer(stack, rel)
    out = Explanation(shown_path, res.node is not None)
    if res.node is not None:
        node = res.node
        out.kind = kind_name(node.kind)
        if node.dirs is not None:
            dirs = stack.dir_paths(node)
            out.layers = [d.layer for d in dirs]
            out.layer = out.layers[0]
            for child in stack.listing(node).values():
                out.entries_from[child.layer] = out.entries_from.get(child.layer, 0) + 1
            redirect = stack.redirect_of(node)
            if redirect is not None:
                out.decided_by.append(
                    Reason(
                        "redirect",
                        0,
                        shown_path,
                        f"moved here from {os.fsdecode(stack.origin_path(node))}",
                    )
                )
        else:
            out.layer = node.layer
        out.hides = [v for v in found if v.layer > (out.layer or 0) and v.layer not in out.layers]
        if node.dirs is None and out.hides:
            out.decided_by.append(
                Reason(
                    "non-directory", node.layer, shown_path, f"a {out.kind} hides the layers below"
                )
            )
    else:
        out.hides = [v for v in found if v.kind != "whiteout"]
    _whiteouts_and_opaques(stack, rel, res, out)
    return out


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _whiteout_at(layer_root: bytes, rel: bytes, oci: bool) -> bool:
    parent, _, name = rel.rpartition(b"/")
    base = layer_root + (b"/" + parent if parent else b"")
    st = _lstat(base + b"/" + name)
    if st is not None and markers.is_chardev_whiteout(st):
        return True
    return oci and _lstat(base + b"/" + markers.WH_PREFIX + name) is not None


def _per_layer(stack: LayerStack, rel: bytes) -> list[Version]:
    """What each layer holds at `rel` itself (top first)."""
    out = []
    for i, root in enumerate(stack.layers):
        oci = not (stack.has_upper and i == 0)
        if rel and _whiteout_at(root, rel, oci):
            out.append(Version(i, "whiteout"))
            continue
        st = _lstat(root + b"/" + rel) if rel else _lstat(root)
        if st is not None:
            out.append(Version(i, kind_name(st.st_mode)))
    return out


def _whiteouts_and_opaques(stack: LayerStack, rel: bytes, res: Resolved, out: Explanation) -> None:
    """The markers that decide: a whiteout of the name (when it is gone), and every opaque
    directory on the way (the path itself included) with lower layers below it."""
    if not out.present and res.stopped_at:
        parent = res.ancestors[-1]
        gone = b"/".join([c for c in rel.split(b"/") if c][: len(res.ancestors)])
        for d in stack.dir_paths(parent):
            oci = not (stack.has_upper and d.layer == 0)
            name = res.stopped_at
            st = _lstat(d.path + b"/" + name)
            if (st is not None and markers.is_chardev_whiteout(st)) or (
                oci and _lstat(d.path + b"/" + markers.WH_PREFIX + name) is not None
            ):
                out.decided_by.append(Reason("whiteout", d.layer, "/" + os.fsdecode(gone)))
                break
            if st is not None and not stat.S_ISDIR(st.st_mode):
                break  # a non-directory in the way: lookup below it fails (ENOTDIR)
    nodes = [*res.ancestors[1:], *([res.node] if res.node is not None else [])]
    for node in nodes:
        if node.dirs is None:
            continue
        last = stack.dir_paths(node)[-1]
        oci = not (stack.has_upper and last.layer == 0)
        marks = markers.dir_marks(last.path, stack.fs)
        opaque = marks.opaque or (oci and _lstat(last.path + b"/" + markers.WH_OPAQUE) is not None)
        below = [v for v in out.hides if v.layer > last.layer]
        if opaque and (below or node is res.node):
            where = "/" + os.fsdecode(stack.merged_path(node))
            out.decided_by.append(Reason("opaque", last.layer, where, "hides the layers below it"))

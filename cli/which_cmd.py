"""`layer which MOUNT-or-IMAGE PATH [--json]`: which layer provides PATH, what it hides, and the
whiteout, opaque directory or redirect that decides it (unionfs.explain, over the daemon's own
LayerStack).  MOUNT is a mount name (`layer ps`; its upper comes first), else IMAGE."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from imagestore import mountrecords
from imagestore.pull import descriptor_layers
from unionfs.explain import explain
from unionfs.stack import LayerStack

from .options import open_store, root_option

if TYPE_CHECKING:
    from .main import Console


def _stack(root: str | None, target: str) -> tuple[LayerStack, list[str]]:
    """The union of a mount (upper first) or an image, and a label per stack layer."""
    store = open_store(root)
    rec = None
    try:
        rec = mountrecords.load(store, target)
    except Exception:  # noqa: BLE001 - not a mount name: try it as an image
        rec = None
    with store.in_use():
        if rec is not None:
            dirs = descriptor_layers(store, rec.image)
            upper = None if rec.read_only else str(rec.upper)
        else:
            dirs = descriptor_layers(store, mountrecords.resolve(store, target), target)
            upper = None
    n = len(dirs)
    labels = [f"layer {n - j} ({_diff_id(d)})" for j, d in enumerate(reversed(dirs))]
    if upper is not None:
        labels.insert(0, f"upper of mount {target}")
    stack = LayerStack([str(d) for d in reversed(dirs)], upper)
    return stack, labels


def _diff_id(layer_dir: Path) -> str:
    return f"sha256:{layer_dir.parent.name[:12]}"


@click.command("which")
@root_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.argument("target", metavar="MOUNT-or-IMAGE")
@click.argument("path")
@click.pass_obj
def which(console: Console, root: str | None, as_json: bool, target: str, path: str) -> None:
    """Explain PATH in MOUNT-or-IMAGE: the layer that provides it (or the upper), the lower
    versions it hides, the whiteout, opaque directory or redirect that decides it, and for a
    directory which layers contribute entries."""
    stack, labels = _stack(root, target)
    ex = explain(stack, path)
    if as_json:
        doc = asdict(ex)
        doc["labels"] = labels
        console.say(json.dumps(doc, indent=2))
        return
    if ex.present:
        assert ex.layer is not None
        console.say(f"{ex.path}: {ex.kind}, from {labels[ex.layer]}")
        for i in ex.layers[1:]:
            console.say(f"  merges     {labels[i]}")
    else:
        console.say(f"{ex.path}: not present")
    for r in ex.decided_by:
        detail = f": {r.detail}" if r.detail else ""
        console.say(f"  {r.rule:10} {labels[r.layer]} at {r.path}{detail}")
    for v in ex.hides:
        console.say(f"  hides      {labels[v.layer]}: a {v.kind}")
    if ex.entries_from:
        parts = [f"{labels[i]}: {k}" for i, k in sorted(ex.entries_from.items())]
        console.say("  entries    " + "; ".join(parts))

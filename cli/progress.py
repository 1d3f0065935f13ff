"""Progress bars on stderr (bytes, rate, ETA), drawn by tqdm: the one place that draws them.

`wanted(quiet, json)` decides for every command alike: bars only when stderr is a terminal
and neither -q nor --json was given, so nothing extra ever reaches a pipe or a log.  Bars are
transient (`leave=False`): once a command ends, only its result stays on the screen.

  - `LayerBars` is the pull/push `Reporter` (imagestore.pull): one bar per layer, the state
    ("downloading", "unpacking", ...) in its description.  Called from worker threads: tqdm
    serialises the drawing, and `_lock` guards the bar table.
  - `PhaseBar` is fsck's `Progress` and commit's byte counter: one bar at a time.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from imagestore.media import Descriptor


def wanted(quiet: bool = False, json: bool = False) -> bool:
    return sys.stderr.isatty() and not quiet and not json


def _bar(desc: str, total: int | None, position: int | None = None) -> Any:
    from tqdm import tqdm  # ~10 ms to import: only when a bar is drawn

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        position=position,
        mininterval=0.2,
    )


class LayerBars:
    """Per-layer bars for pull and push (imagestore.pull.Reporter)."""

    def __init__(self, verb: str = "") -> None:
        self._lock = threading.Lock()
        self._bars: dict[int, Any] = {}
        self._verb = verb

    def _get(self, index: int, desc: Descriptor) -> Any:
        with self._lock:
            bar = self._bars.get(index)
            if bar is None:
                bar = _bar(f"layer {index + 1} {desc.digest.short}", desc.size, position=index)
                self._bars[index] = bar
            return bar

    def layer(self, index: int, desc: Descriptor, state: str) -> None:
        bar = self._get(index, desc)
        bar.set_description_str(f"layer {index + 1} {desc.digest.short} {state}")
        if state in ("done", "already present", "exists", "skipped"):
            bar.update(max(0, (bar.total or 0) - bar.n))

    def progress(self, index: int, done: int, total: int | None) -> None:
        with self._lock:
            bar = self._bars.get(index)
        if bar is None:
            return
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        with self._lock:
            bars, self._bars = list(self._bars.values()), {}
        for bar in bars:
            bar.close()


class PhaseBar:
    """One bar at a time (fsck's phases; commit's layer): imagestore.fsck.Progress."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, label: str, total: int | None) -> None:
        self.finish()
        self._bar = _bar(label, total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

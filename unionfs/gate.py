"""The freeze gate: holds the mount's mutating requests while a `layer commit` (or `diff`)
reads the upper (`control.py` is the socket that freezes and thaws it).

Concurrency: the daemon's trio thread; `enter`/`leave` bracket each mutating handler; no
locks needed (code between two awaits is atomic).  Every freezer that waits for the
in-flight requests to drain waits on the same event, which the last `leave` sets, so
overlapping freezes all complete; a freeze that is cancelled while it waits undoes itself.
trio is imported only by a freeze (under trio): the handlers import this module before trio
is loaded, and answer without trio until something needs it (fuse/run.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio


class Gate:
    """Holds mutating requests while at least one freezer holds the mount."""

    def __init__(self) -> None:
        self._freezers = 0
        self._thawed: trio.Event | None = None  # set when the last freezer lets go
        self._inflight = 0
        self._drained: trio.Event | None = None  # shared by every freezer waiting to drain

    @property
    def frozen(self) -> bool:
        return self._thawed is not None

    async def enter(self) -> None:
        while self._thawed is not None:
            await self._thawed.wait()
        self._inflight += 1

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            event, self._drained = self._drained, None
            event.set()

    async def freeze(self) -> None:
        """Stop admitting mutating requests, then wait until those in flight have left.
        Cancelled while waiting, it lets go of its hold again."""
        import trio

        self._freezers += 1
        if self._thawed is None:
            self._thawed = trio.Event()
        try:
            while self._inflight:
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
        except BaseException:
            self.thaw()
            raise

    def thaw(self) -> None:
        self._freezers = max(0, self._freezers - 1)
        if self._freezers == 0 and self._thawed is not None:
            event, self._thawed = self._thawed, None
            event.set()

"""The freeze gate: holds the mount's mutating requests while a `layer commit` (or `diff`)
reads the upper (`control.py` is the socket that freezes and thaws it).

Some open files write past the gate: a file CREATE made for writing passes its data through
to the upper file (FUSE passthrough, fuse/passthrough.py), and the kernel has no way to take
that back from an open file.  The gate keeps count of them ("bypassing" handles), admits no
new ones while a freezer holds or waits, and a freeze first waits — with the gate still
open — until those left are closed: their writers may need other requests answered before
they close (tar sets a file's owner and times between its last write and its close), so
holding those while waiting for the close would wait for ever.  A freeze gives up with
`Bypassed` when they are not closed in time.

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


BYPASS_WAIT = 10.0  # seconds a freeze waits, by default, for those files to be closed


class Bypassed(Exception):
    """Open files that write past the gate were not closed in time: their inode numbers."""

    def __init__(self, inos: list[int]) -> None:
        super().__init__(f"{len(inos)} file(s) open for writing past the gate")
        self.inos = inos


class Gate:
    """Holds mutating requests while at least one freezer holds the mount."""

    def __init__(self) -> None:
        self._freezers = 0
        self._thawed: trio.Event | None = None  # set when the last freezer lets go
        self._inflight = 0
        self._drained: trio.Event | None = None  # shared by every freezer waiting to drain
        self._bypass: dict[int, int] = {}  # handle → inode: open files writing past the gate
        self._bypass_gone: trio.Event | None = None  # set when the last of them is closed

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

    @property
    def may_bypass(self) -> bool:
        """May a new open file write past the gate?  Not while a freezer holds or waits."""
        return self._freezers == 0

    def bypass_open(self, fh: int, ino: int) -> None:
        self._bypass[fh] = ino

    def bypass_close(self, fh: int) -> None:
        if self._bypass.pop(fh, None) is not None and not self._bypass:
            if self._bypass_gone is not None:
                event, self._bypass_gone = self._bypass_gone, None
                event.set()

    async def freeze(self, bypass_wait: float = BYPASS_WAIT) -> None:
        """Wait (up to `bypass_wait` seconds, admitting no new ones) until no open file
        writes past the gate, else raise Bypassed; then stop admitting mutating requests
        and wait until those in flight have left.  Cancelled or failed, it lets go of its
        hold again."""
        import trio

        self._freezers += 1
        try:
            with trio.move_on_after(bypass_wait):
                while self._bypass:
                    if self._bypass_gone is None:
                        self._bypass_gone = trio.Event()
                    await self._bypass_gone.wait()
            if self._bypass:
                raise Bypassed(sorted(set(self._bypass.values())))
            if self._thawed is None:
                self._thawed = trio.Event()
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

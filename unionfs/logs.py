"""The daemon's logger for the modules that run before the mount is live, without importing
`logging` there: it cost 2-3 ms of CPU in every mount's start (measured against the code
before; `-X importtime` claims ~7 ms), podman starts a mount program per container, and
before INIT is answered nothing is logged unless something goes wrong.

`log` stands in for `logging.getLogger("layerfs")`: `log.debug` is dropped without importing
anything unless `configure` said debug; any other call imports `logging`, runs the set-up
`configure` was given (once), and goes to the real logger.  Whoever sets up the handlers
for good (`daemon._detach_stdio`) calls `settled` so that a pending set-up never replaces
them.  Modules that are imported only once the mount is live use `logging` directly.

Concurrency: set up and first used in the daemon's one thread before any other starts.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant: importing typing (and re) costs every mount
if TYPE_CHECKING:  # ~5 ms before INIT, so the pre-INIT modules import it only for mypy
    from collections.abc import Callable
    from typing import Any


_debug = False
_setup: Callable[[], None] | None = None


def configure(debug: bool, setup: Callable[[], None]) -> None:
    """Log at debug level or not; `setup` (which imports logging) runs at the first record."""
    global _debug, _setup
    _debug, _setup = debug, setup


def settled() -> None:
    """The handlers are in place: a pending set-up must not run any more."""
    global _setup
    _setup = None


def debug_enabled() -> bool:
    return _debug


def real() -> Any:
    """The `layerfs` logger, after the pending set-up."""
    global _setup
    import logging

    setup, _setup = _setup, None
    if setup is not None:
        setup()
    return logging.getLogger("layerfs")


class _Lazy:
    __slots__ = ()

    def debug(self, *args: Any, **kwargs: Any) -> None:
        if _debug:
            real().debug(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(real(), name)


log: Any = _Lazy()

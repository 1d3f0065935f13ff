"""`Progress`: the callback every blob transfer reports to, `progress(done, total)` in bytes
(total None when unknown).  Its own module so that sources, registry_source and registry share
the one type without importing each other; pull.Reporter adapts it per layer.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int | None], None]

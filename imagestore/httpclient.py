"""httpx and httpcore, imported without the optional libraries they probe for.

httpcore imports trio and anyio at import time, when installed, for its async primitives, and
httpx imports pygments and rich for its command-line client.  The store uses only httpx's
synchronous client, yet this project installs trio (layerfs runs on it) and pygments (pytest
brings it), so every `layer pull` or `push` paid ~85 ms to import them.  Here they are hidden
while httpx is imported (a None entry in sys.modules makes `import` raise ImportError, which
both libraries expect when those are absent) and put back at once, so anything importing them
later gets them as usual; only httpcore's async primitives and the `httpx` command, which
nothing here uses, do without.
Every module of the store imports httpx and httpcore from here.  Import-time only; no state.
"""

from __future__ import annotations

import sys

_hidden = [name for name in ("trio", "anyio", "pygments") if name not in sys.modules]
for _name in _hidden:
    sys.modules[_name] = None  # type: ignore[assignment]
try:
    import httpcore
    import httpx
finally:
    for _name in _hidden:
        if sys.modules.get(_name, ...) is None:
            del sys.modules[_name]

__all__ = ["httpcore", "httpx"]

"""Digest: the one value type for OCI content digests (`sha256:<64 hex>`).

Three hashes are never confused (DESIGN.md): a blob's digest (sha256 of the stored, maybe
compressed bytes), a layer's DiffID (sha256 of the uncompressed tar) and a ChainID (identity of
a stack prefix; the store keys unpacked layers by DiffID and computes no ChainID, since each
layer is unpacked on its own rather than on top of its parent).  All three are Digests; the
names of variables say which.  xxhash values are fingerprints and never become Digests.
Immutable values; thread-safe.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import BadReference

_HEX = {"sha256": 64, "sha512": 128}
_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _RE.match(text)
        if not m or m.group(1) not in _HEX:
            raise BadReference(f"not a digest: {text!r}")
        algo, hexpart = m.group(1), m.group(2)
        if len(hexpart) != _HEX[algo] or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise BadReference(f"not a valid {algo} digest: {text!r}")
        return cls(algo, hexpart)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hash(cls, h: hashlib._Hash) -> Digest:  # type: ignore[name-defined]
        return cls(h.name, h.hexdigest())

    def hasher(self) -> hashlib._Hash:  # type: ignore[name-defined]
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]

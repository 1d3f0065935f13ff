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
_LOWER_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        """Only valid digests exist: a known algorithm and exactly its number of lowercase hex
        digits (BadReference otherwise), whoever builds one."""
        want = _HEX.get(self.algorithm)
        if want is None:
            raise BadReference(f"unsupported digest algorithm {self.algorithm!r}")
        if len(self.hex) != want or not _LOWER_HEX.fullmatch(self.hex):
            raise BadReference(f"not a valid {self.algorithm} digest: {self.hex!r}")

    @staticmethod
    def hasher_for(algorithm: str = "sha256") -> hashlib._Hash:  # type: ignore[name-defined]
        """A fresh hash object for digests of `algorithm` (before any digest is known)."""
        if algorithm not in _HEX:
            raise BadReference(f"unsupported digest algorithm {algorithm!r}")
        return hashlib.new(algorithm)

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _RE.match(text)
        if not m or m.group(1) not in _HEX:
            raise BadReference(f"not a digest: {text!r}")
        try:
            return cls(m.group(1), m.group(2))
        except BadReference:
            raise BadReference(f"not a valid {m.group(1)} digest: {text!r}") from None

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hash(cls, h: hashlib._Hash) -> Digest:  # type: ignore[name-defined]
        return cls(h.name, h.hexdigest())

    def hasher(self) -> hashlib._Hash:  # type: ignore[name-defined]
        """A fresh hash object to check content against this digest."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return self.hex[:12]

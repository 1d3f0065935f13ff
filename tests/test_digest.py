"""Digest: only valid digests exist; hashers come from the type, not from an empty digest."""

import hashlib

import pytest

from imagestore.digest import Digest
from imagestore.errors import BadReference

HEX = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(
    "algorithm, hexpart",
    [("sha256", ""), ("sha256", HEX[:-1]), ("sha256", HEX.upper()), ("md5", HEX),
     ("sha256", HEX[:-1] + "g"), ("sha512", HEX)],
)  # fmt: skip
def test_invalid_digests_cannot_be_made(algorithm, hexpart):
    with pytest.raises(BadReference):
        Digest(algorithm, hexpart)


def test_parse_and_hashers():
    d = Digest.parse(f"sha256:{HEX}")
    assert d == Digest("sha256", HEX) and str(d) == f"sha256:{HEX}"
    h = Digest.hasher_for()
    h.update(b"x")
    assert Digest.from_hash(h) == d
    with pytest.raises(BadReference):
        Digest.hasher_for("md5")
    with pytest.raises(BadReference, match="not a valid sha256 digest"):
        Digest.parse("sha256:abc")

"""tarsafe, through unpack_layer: hostile layers (each must fail with CorruptLayer, leave
nothing in the store and write nothing outside it), and the limits on entries and headers."""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import pytest

from imagestore import tarsafe
from imagestore.errors import CorruptLayer
from imagestore.store import Store
from imagestore.unpack import unpack_layer
from tests.layertar import (
    OCI_GZIP,
    OCI_TAR,
    SAMPLE,
    D,
    F,
    H,
    S,
    make_tar,
    unpacked,
    zstd_frames,
)

# ----- hostile layers ------------------------------------------------------------------------
ESCAPE = "../../../../canary"  # from layers/.tmp-x/diff up to tmp_path


def huge_file_header() -> bytes:
    info = tarfile.TarInfo("big")
    info.size = tarsafe.MAX_FILE_SIZE + 1
    return info.tobuf(tarfile.PAX_FORMAT) + bytes(4096)


def odd_type() -> bytes:
    info = tarfile.TarInfo("volume")
    info.type = b"V"
    return make_tar((info, b""))


def corrupt(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    for i in range(at, at + 16):
        out[i] ^= 0x5A
    return bytes(out)


HOSTILE = {
    "dotdot": lambda c: make_tar(F(f"{ESCAPE}/pwned")),
    "inner-dotdot": lambda c: make_tar(F("a/../../../../../canary/pwned")),
    "symlink-parent-absolute": lambda c: make_tar(S("esc", str(c)), F("esc/pwned")),
    "symlink-parent-relative": lambda c: make_tar(S("up", ESCAPE), F("up/pwned")),
    "symlink-deeper": lambda c: make_tar(D("d"), S("d/s", "/"), F("d/s/tmp/pwned")),
    "symlink-parent-dir-entry": lambda c: make_tar(S("esc", str(c)), D("esc/pwned")),
    "hardlink-outside": lambda c: make_tar(H("h", f"{ESCAPE}/secret")),
    "hardlink-absolute": lambda c: make_tar(H("h", str(c / "secret"))),
    "hardlink-through-symlink": lambda c: make_tar(S("s", str(c)), H("h", "s/secret")),
    "hardlink-forward": lambda c: make_tar(H("h", "later"), F("later")),
    "hardlink-to-dir": lambda c: make_tar(D("d"), H("h", "d")),
    "hardlink-to-whiteout": lambda c: make_tar(F(".wh.w"), H("h", "w")),
    "long-name": lambda c: make_tar(F("x" * 256)),
    "long-path": lambda c: make_tar(F("/".join(["p" * 250] * 17))),
    "huge-file": lambda c: huge_file_header(),
    "odd-type": lambda c: odd_type(),
    "file-below-file": lambda c: make_tar(F("f"), F("f/g")),
    "root-as-file": lambda c: make_tar(F("./")),
    "whiteout-dotdot": lambda c: make_tar(F(".wh..."), F(".wh..")),
    "whiteout-as-dir": lambda c: make_tar(F(".wh.x/y")),
    "truncated-tar": lambda c: SAMPLE[:3000],
    "garbage-header": lambda c: make_tar(F("a", b"1"))[:1024] + b"\xff" * 512 + bytes(1024),
    "not-a-tar": lambda c: b"\xff" * 2048,
    "truncated-gzip": lambda c: gzip.compress(SAMPLE)[:-30],
    "corrupt-gzip": lambda c: corrupt(gzip.compress(SAMPLE), 2000),
    "gzip-trailing-garbage": lambda c: gzip.compress(SAMPLE) + b"garbage!",
    "truncated-zstd": lambda c: zstd_frames(SAMPLE)[:-10],
    "truncated-zstd-frame": lambda c: zstd_frames(SAMPLE, 3)[:-400],
    "corrupt-zstd": lambda c: corrupt(zstd_frames(SAMPLE), 300),
}


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "secret").write_bytes(b"do not touch")
    return c


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers(store: Store, canary: Path, tmp_path: Path, case: str) -> None:
    earlier = unpacked(store, make_tar(F("earlier")))
    digest = store.put_bytes(HOSTILE[case](canary))
    with pytest.raises(CorruptLayer) as info:
        unpack_layer(store, digest, OCI_GZIP)
    assert str(info.value).startswith(f"layer {digest.short}")
    assert os.listdir(store.layers) == [earlier.parent.name]
    assert os.listdir(canary) == ["secret"] and (canary / "secret").read_bytes() == b"do not touch"
    assert os.stat(canary / "secret").st_nlink == 1
    assert not [p for p, _, names in os.walk(tmp_path) for n in names if n == "pwned"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("dotdot", "escapes the layer root"),
        ("symlink-parent-absolute", "parent 'esc' is a symlink"),
        ("hardlink-forward", "not an earlier file"),
        ("long-name", "longer than 255"),
        ("huge-file", "'big'"),
        ("odd-type", "unsupported tar entry type"),
        ("truncated-zstd", "truncated zstd"),
        ("truncated-gzip", "corrupt or truncated gzip"),
        ("garbage-header", "invalid tar header"),
    ],
)
def test_hostile_errors_name_the_problem(store: Store, canary: Path, case: str, words: str) -> None:
    digest = store.put_bytes(HOSTILE[case](canary))
    with pytest.raises(CorruptLayer, match=words):
        unpack_layer(store, digest, OCI_TAR)


def test_limits_on_entries_and_headers(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(tarsafe, "MAX_ENTRIES", 3)
    digest = store.put_bytes(make_tar(*[F(f"f{i}") for i in range(5)]))
    with pytest.raises(CorruptLayer, match="more than 3 entries"):
        unpack_layer(store, digest, OCI_TAR)
    monkeypatch.setattr(tarsafe, "MAX_HEADER_SIZE", 1000)
    digest = store.put_bytes(make_tar(F("x", pax={"comment": "y" * 2000})))
    with pytest.raises(CorruptLayer, match="extended header"):
        unpack_layer(store, digest, OCI_TAR)
    assert os.listdir(store.layers) == []

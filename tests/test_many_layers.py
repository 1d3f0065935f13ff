"""No practical layer limit: 500 lower layers mount and resolve (the kernel stops at 500,
and at ~128 with lowerdir= strings near a page)."""

from __future__ import annotations

import os

import pytest

from tests.layerdata import whiteout, write
from tests.mounts import LayerfsMount

pytestmark = pytest.mark.mount

DEPTH = 500


def test_500_layers(tmp_path, fuse):
    layers = []
    for i in range(DEPTH):  # i = 0 is the bottom
        p = tmp_path / "layers" / f"{i:03d}"
        write(p / "shared" / f"from-{i:03d}", str(i).encode())
        write(p / "over", f"layer {i}".encode())
        if i % 50 == 49:
            whiteout(p / "shared" / f"from-{i - 1:03d}")
        layers.append(p)
    write(layers[0] / "usr/lib/deep/bottom-only", b"bottom")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with LayerfsMount(mnt, list(reversed(layers))):
        assert (mnt / "over").read_bytes() == b"layer 499"
        assert (mnt / "usr/lib/deep/bottom-only").read_bytes() == b"bottom"
        names = set(os.listdir(mnt / "shared"))
        hidden = {f"from-{i - 1:03d}" for i in range(DEPTH) if i % 50 == 49}
        assert names == {f"from-{i:03d}" for i in range(DEPTH)} - hidden
        assert (mnt / "shared" / "from-000").read_bytes() == b"0"

"""The demo's third act: the sample as an image — pull it into a temporary store, mount it
with `layer mount`, change it, unmount.  Runs the real `layer` commands, printed as it goes.

The image is an OCI layout written here with tarfile (two gzip layers, the second with an OCI
`.wh.` whiteout), so the act needs no network.  Returns the failed checks; always unmounts.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from imagestore.layout_writer import write_oci_image
from unionfs import markers

from . import mounts
from .demo_copyup import report_checks

if TYPE_CHECKING:
    from .console import Console

LAYER = str(Path(sys.executable).parent / "layer")
IMAGE_LAYERS = [
    {
        "etc/os-release": b'NAME="Layer Demo Linux"\nID=layerdemo\n',
        "etc/motd": b"Welcome! This line lives in the base layer.\n",
        "usr/bin/hello": b'#!/bin/sh\necho "hello from the base layer"\n',
    },
    {
        os.fsdecode(markers.oci_whiteout_path(b"etc/motd")): b"",  # hides the base's etc/motd
        "etc/app.conf": b"greeting = hello\n",
    },
]


def write_sample_image(root: Path) -> None:
    tars = []
    for files in IMAGE_LAYERS:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size, info.mtime = len(data), 1_600_000_000
                info.mode = 0o755 if path.startswith("usr/bin") else 0o644
                tf.addfile(info, io.BytesIO(data))
        tars.append(buf.getvalue())
    write_oci_image(root, tars, "sample")


def run_layer(console: Console, *args: str) -> str:
    console.say("$ layer " + " ".join(args))
    r = subprocess.run([LAYER, *args], capture_output=True, text=True, timeout=120)
    for line in (r.stdout + r.stderr).splitlines():
        console.say("  " + line)
    if r.returncode != 0:
        raise RuntimeError(f"layer {args[0]} failed ({r.returncode})")
    return r.stdout


def show_image(console: Console, root: Path) -> list[str]:
    console.heading("An image: pull it into a store, mount it with `layer mount`")
    layout, store, mnt = root / "image", root / "store", root / "merged-image"
    write_sample_image(layout)
    mnt.mkdir()
    run_layer(
        console, "pull", "--root", str(store), "--name", "demo/sample:1", f"oci:{layout}:sample"
    )
    run_layer(console, "images", "--root", str(store))
    run_layer(console, "mount", "--root", str(store), "demo/sample:1", str(mnt), "--name", "demo")
    try:
        names = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        console.say("merged: " + " ".join(names))
        (mnt / "etc/app.conf").write_text("greeting = changed in the mount\n")
        upper = store / "mounts/demo/upper"
        run_layer(console, "ps", "--root", str(store))
        diff = run_layer(console, "diff", "--root", str(store), "demo")
        new_digest = run_layer(
            console, "commit", "--root", str(store), "-m", "demo change", "demo", "demo/sample:2"
        ).strip()
        run_layer(console, "images", "--root", str(store))
    finally:
        if not mounts.unmount_quietly(str(mnt)):
            console.warn(f"could not unmount {mnt}")
    console.say(
        f"after umount, the mount's upper ({upper.relative_to(root)}) keeps: "
        + " ".join(sorted(str(p.relative_to(upper)) for p in upper.rglob("*")))
    )
    checks = [
        ("the image mounts with its files", "usr/bin/hello" in names),
        ("the image's whiteout hides etc/motd", "etc/motd" not in names),
        (
            "the change was copied up into the mount's upper",
            (upper / "etc/app.conf").read_text().startswith("greeting = changed"),
        ),
        ("layer diff reports the change", "C /etc/app.conf" in diff),
        ("layer commit made a new image", new_digest.startswith("sha256:")),
    ]
    return report_checks(console, checks)

"""unpack.unpack_fresh of each layer of an OCI layout, the old tarfile loop (A) and tarstream (B)
alternating in one process (sync before each run); medians of wall and CPU time."""

import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from imagestore import tarsafe, tarstream, unpack
from imagestore.digest import Digest
from imagestore.errors import CorruptLayer
from imagestore.store import Store


def old_apply_all(stream, writer):  # unpack._apply_all before tarstream, verbatim
    try:
        tar = tarfile.open(
            fileobj=stream, mode="r|", tarinfo=tarsafe.SafeTarInfo, bufsize=unpack.TAR_BUFSIZE
        )
    except tarstream.TAR_ERRORS as exc:
        if stream.size == 0:
            return 0
        raise CorruptLayer(f"not a tar archive: {exc}") from exc
    count = 0
    while True:
        try:
            member = tar.next()
        except tarstream.TAR_ERRORS as exc:
            raise CorruptLayer(f"bad tar header after {count} entries: {exc}") from exc
        if member is None:
            return tar.offset
        tar.members.clear()
        count += 1
        if count > tarsafe.MAX_ENTRIES:
            raise CorruptLayer(f"more than {tarsafe.MAX_ENTRIES} entries")
        writer.apply(member, tar)


new_apply_all = unpack._apply_all
layout, root, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def blob(d):
    return layout / "blobs" / "sha256" / d.split(":")[1]


man = json.loads(
    blob(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]).read_bytes()
)
store = Store.open(root)
layers = []
for layer in man["layers"]:
    d = Digest.parse(layer["digest"])
    if not store.has_blob(d):
        store.put_bytes(blob(layer["digest"]).read_bytes())
    layers.append((d, layer["mediaType"]))
res = {"A tarfile": [], "B tarstream": []}
for i in range(n):
    for label, fn in (("A tarfile", old_apply_all), ("B tarstream", new_apply_all))[
        :: 1 if i % 2 else -1
    ]:
        unpack._apply_all = fn
        wall = cpu = 0.0
        for d, mt in layers:
            subprocess.run(["sync"])
            t, c = time.perf_counter(), time.process_time()
            tmp, _ = unpack.unpack_fresh(store, d, mt, None)
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            unpack.remove_tree(tmp)
        res[label].append((wall, cpu))
for label, v in res.items():
    print(
        f"{label}: wall median {statistics.median(w for w, _ in v):.3f} s, "
        f"cpu median {statistics.median(c for _, c in v):.3f} s;",
        " ".join(f"{w:.2f}/{c:.2f}" for w, c in v),
    )

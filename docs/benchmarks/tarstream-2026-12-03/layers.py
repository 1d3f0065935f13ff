"""Write the uncompressed layer tars of an OCI layout to files (for the parse-only benchmark)."""

import gzip
import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])


def blob(d):
    return root / "blobs" / "sha256" / d.split(":")[1]


idx = json.loads((root / "index.json").read_text())
man = json.loads(blob(idx["manifests"][0]["digest"]).read_bytes())
for i, layer in enumerate(man["layers"]):
    (out.parent / f"{out.name}{i}.tar").write_bytes(
        gzip.decompress(blob(layer["digest"]).read_bytes())
    )

"""Parse-only cost per entry: tarstream.TarReader against tarfile (r|, SafeTarInfo, 16 KiB
reads), data skipped; median of 5."""

import io
import statistics
import sys
import tarfile
import time

from imagestore import tarsafe, tarstream
from imagestore.unpack import TAR_BUFSIZE


def fast(data):
    r = tarstream.TarReader(io.BytesIO(data), TAR_BUFSIZE)
    n = 0
    while r.next() is not None:
        n += 1
    return n


def slow(data):
    tar = tarfile.open(
        fileobj=io.BytesIO(data), mode="r|", tarinfo=tarsafe.SafeTarInfo, bufsize=TAR_BUFSIZE
    )
    n = 0
    while tar.next() is not None:
        tar.members.clear()
        n += 1
    return n


def skim(data):  # the floor: reading the stream in 16 KiB pieces, nothing parsed
    s = io.BytesIO(data)
    while s.read(TAR_BUFSIZE):
        pass
    return 1


def med(fn, data, k=5):
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        n = fn(data)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), n


for label, data in ((p, open(p, "rb").read()) for p in sys.argv[1:]):
    (tf, n), (ts, n2), (tr, _) = med(slow, data), med(fast, data), med(skim, data)
    assert n == n2
    print(
        f"{label}: {n} entries; tarfile {tf * 1e3:.1f} ms ({tf / n * 1e6:.1f} us/entry); "
        f"tarstream {ts * 1e3:.1f} ms ({ts / n * 1e6:.2f} us/entry); "
        f"stream read alone {tr * 1e3:.1f} ms; x{tf / ts:.1f}"
    )

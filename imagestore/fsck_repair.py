"""fsck --repair: re-unpack damaged layers from their verified blobs and swap them in.

    repair(store, report, users, force) -> list[Repair]

For each layer a `fsck.check` report flags (`Problem.layer_fix`), once per layer:
  - the blob is unpacked afresh into `layers/.tmp-*` (`unpack.unpack_fresh`: the blob's
    digest and the DiffID are verified while streaming; a corrupt blob fails the repair,
    and nothing changes);
  - a layer that only lacked fingerprints is compared with the fresh one's: when equal, the
    fresh fingerprints file is renamed into it and nothing else changes (no mount is
    disturbed); when not, the layer is damaged after all and handled as below;
  - a damaged layer is swapped with the fresh tree in one `renameat2(RENAME_EXCHANGE)` of
    the two directories (a reader sees the old tree or the new one, never a mix), then the
    old tree is removed.  While a live mount uses the layer this is refused unless `force`,
    naming the mount: `users(diff_id)` (from the CLI, which knows the mount table) says
    which mounts are live on it.
Locks: the store's `in_use` (gc waits) and the per-layer unpack lock (a concurrent unpack of
the same layer waits).  Blobs are never repaired here: a corrupt blob needs a new pull.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import fingerprints, fsck, unpack
from .digest import Digest
from .errors import StoreError
from .store import Store, write_atomic

RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Repair:
    diff_id: Digest
    done: bool
    message: str

    def to_json(self) -> dict[str, object]:
        return {"layer": str(self.diff_id), "repaired": self.done, "message": self.message}


Users = Callable[[Digest], list[str]]  # live mounts using a layer, as "NAME on MOUNTPOINT"


def repair(store: Store, report: fsck.Report, users: Users, force: bool = False) -> list[Repair]:
    todo: dict[Digest, bool] = {}  # DiffID → damaged (False: only its fingerprints lack)
    for p in [*report.problems, *report.notes]:
        if p.layer_fix is not None:
            damaged = p in report.problems
            todo[p.layer_fix] = todo.get(p.layer_fix, False) or damaged
    out = []
    with store.in_use():
        for diff_id, damaged in todo.items():
            try:
                out.append(_repair_layer(store, report, diff_id, damaged, users, force))
            except StoreError as exc:
                out.append(Repair(diff_id, False, f"layer {diff_id.short}: {exc}"))
    return out


def _repair_layer(
    store: Store,
    report: fsck.Report,
    diff_id: Digest,
    damaged: bool,
    users: Users,
    force: bool,
) -> Repair:
    blob, media_type = report.layer_blobs[diff_id]
    label = f"layer {diff_id.short}"
    if not store.has_layer(diff_id):  # gone since the check: unpack it as a pull would
        unpack.unpack_layer(store, blob, media_type, diff_id)
        return Repair(diff_id, True, f"{label}: unpacked from blob {blob}")
    with unpack.layer_lock(store, diff_id):
        tmp, _ = unpack.unpack_fresh(store, blob, media_type, diff_id)
        try:
            if not damaged:
                entries = _entries_if_same(store, diff_id, tmp)
                if entries is not None:
                    dest = store.layers / diff_id.hex / fingerprints.FILE_NAME
                    fingerprints.write(dest, entries)
                    return Repair(diff_id, True, f"{label}: fingerprints made from blob {blob}")
            live = users(diff_id)
            if live and not force:
                return Repair(
                    diff_id,
                    False,
                    f"{label}: not repaired: in use by live mount {', '.join(live)} "
                    "(unmount it, or use --force)",
                )
            _swap(store, diff_id, tmp)  # tmp now names the old tree, removed below
            return Repair(diff_id, True, f"{label}: re-unpacked from blob {blob}")
        finally:
            unpack.remove_tree(tmp)


def _entries_if_same(store: Store, diff_id: Digest, fresh: Path) -> list[fingerprints.Entry] | None:
    """The layer's own entries (content hashed) when it equals the fresh unpack, else None.
    The mtimes of directories and whiteouts may differ: a directory the tar does not list,
    and a whiteout (made from a `.wh.` name), get the time of the unpack that made them."""
    root_fd = os.open(store.layer_dir(diff_id), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    seen: list[fingerprints.Entry] = []

    def digest_of(dir_fd: int, name: bytes, st: os.stat_result) -> bytes:
        return fingerprints.hash_file(dir_fd, name)

    def walked() -> Iterator[fingerprints.Entry]:
        for e in fingerprints.walk(root_fd, digest_of):
            seen.append(e)
            yield e

    try:
        expected = fingerprints.read(fresh / fingerprints.FILE_NAME)
        for d in fingerprints.compare(expected, walked()):
            if not (d.kind == "changed" and d.what == "mtime" and _unpack_time(seen, d.path)):
                return None
    finally:
        os.close(root_fd)
    return seen


def _unpack_time(seen: list[fingerprints.Entry], path: bytes) -> bool:
    """Is the entry just compared (the last one walked) one whose mtime the unpack sets?"""
    if not seen or seen[-1].path != path:
        return False
    e = seen[-1]
    return stat.S_ISDIR(e.mode) or (stat.S_ISCHR(e.mode) and e.rdev == 0)


def _swap(store: Store, diff_id: Digest, fresh: Path) -> None:
    """Exchange layers/<hex> with the fresh tree (marked complete first): atomic."""
    final = store.layers / diff_id.hex
    write_atomic(fresh / unpack.MARKER, f"{diff_id}\n".encode())
    rc = _libc.renameat2(
        _AT_FDCWD, os.fsencode(fresh), _AT_FDCWD, os.fsencode(final), RENAME_EXCHANGE
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(final))
    with contextlib.suppress(OSError):
        fd = os.open(store.layers, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

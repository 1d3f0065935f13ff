"""fsck: prove that the store still holds what its digests and fingerprints say.

    check(store, images, progress, mount_state) -> Report

Checks, in this order (each one reads, none writes):
  - blobs: every file under blobs/sha256 hashes to its name (streamed, sha256);
  - the index and tags: index.json parses; each tag's manifest, config and layer blobs are
    present and parse (a blob that is present but corrupt is the blob check's finding);
  - unpacked layers: every `layers/<hex>` is complete and equals its fingerprints: missing,
    extra and changed entries, the xxh3-128 of every regular file (module fingerprints).  A
    layer unpacked before fingerprints existed is a *note*, not a problem (`repair` makes them);
  - mount records: each parses, its pinned image is present, a writable one has its upper
    and work dirs, and its daemon is not dead (`mount_state`, from the CLI: the store knows
    nothing of FUSE).
With `images`, only those images' blobs, layers and the mounts pinning them are checked.

`Report.problems` are what makes `layer fsck` exit 1; `notes` are worth knowing but harmless
(debris that `gc` removes, layers without fingerprints, layers not unpacked yet).
`fsck_repair.repair` acts on a report.  Single-threaded; reads only, so it runs beside
mounts and pulls (a layer being unpacked is a `.tmp-*` dir, skipped as debris).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import fingerprints, media, mountrecords
from .digest import Digest
from .errors import DamagedStore, StoreError
from .media import BadManifest, Descriptor
from .store import Store

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
READ_CHUNK = 1 << 20


class Progress(Protocol):
    """Told about each phase of the check, in bytes (blobs, then each layer's content)."""

    def start(self, label: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Problem:
    """One finding.  `kind`: blob, index, image, layer, fingerprints, mount.  `subject`: the
    digest or name.  `layer_fix`: the DiffID a `--repair` would re-unpack (or give
    fingerprints to), when re-unpacking it from its blob fixes this."""

    kind: str
    subject: str
    message: str
    layer_fix: Digest | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "subject": self.subject, "message": self.message}
        if self.layer_fix is not None:
            out["repair"] = "re-unpack the layer from its blob"
        return out


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("blobs", "blob_bytes", "images", "layers", "entries", "content_bytes", "mounts"), 0
        )
    )
    layer_blobs: dict[Digest, tuple[Digest, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "problems": [p.to_json() for p in self.problems],
            "notes": [p.to_json() for p in self.notes],
            "checked": self.checked,
        }


MountState = Callable[[mountrecords.MountRecord], str]  # "live", "dead" or "stopped"


def check(
    store: Store,
    images: list[str] | None = None,
    progress: Progress | None = None,
    mount_state: MountState | None = None,
) -> Report:
    progress = progress or NoProgress()
    report = Report()
    descs = _image_descs(store, images, report)
    records = mountrecords.all_records(
        store, lambda name, exc: report.problems.append(Problem("mount", name, str(exc)))
    )
    if images is not None:
        wanted = {d.digest for _, d in descs}
        records = [r for r in records if r.image.digest in wanted]
    blobs, layers = _scope(store, descs + [(r.name, r.image) for r in records], report)
    report.checked["images"] = len(descs)
    _check_blobs(store, None if images is None else blobs, report, progress)
    _check_layers(store, None if images is None else layers, report, progress)
    _check_records(store, records, report, mount_state)
    if images is None:
        _notes_on_debris(store, report)
    return report


# ----- blobs -------------------------------------------------------------------------------
def _check_blobs(
    store: Store, only: set[Digest] | None, report: Report, progress: Progress
) -> None:
    paths = sorted(store.blobs.iterdir()) if only is None else [store.blob_path(d) for d in only]
    paths = [p for p in paths if p.is_file() and not p.is_symlink()]
    total = sum(p.stat().st_size for p in paths)
    progress.start(f"blobs ({len(paths)})", total)
    try:
        for path in paths:
            name = path.name
            if not _HEX64.match(name):
                report.notes.append(Problem("blob", name, f"stray file {path} in blobs/sha256"))
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(READ_CHUNK):
                    h.update(chunk)
                    progress.advance(len(chunk))
            report.checked["blobs"] += 1
            report.checked["blob_bytes"] += path.stat().st_size
            if h.hexdigest() != name:
                report.problems.append(
                    Problem(
                        "blob",
                        f"sha256:{name}",
                        f"blob sha256:{name} is corrupt: its content hashes to "
                        f"sha256:{h.hexdigest()} (pull the image again)",
                    )
                )
    finally:
        progress.finish()


# ----- the index, tags and the images they name ----------------------------------------------
def _image_descs(
    store: Store, images: list[str] | None, report: Report
) -> list[tuple[str, Descriptor]]:
    try:
        if images is None:
            return store.images()
        return [(name, mountrecords.resolve(store, name)) for name in images]
    except DamagedStore as exc:
        report.problems.append(Problem("index", "index.json", str(exc)))
        return []


def _scope(
    store: Store, descs: Iterable[tuple[str, Descriptor]], report: Report
) -> tuple[set[Digest], set[Digest]]:
    """The blobs and DiffIDs the images name, checking that each is present and parses;
    fills `report.layer_blobs` (DiffID → a blob that holds it, with its media type)."""
    blobs: set[Digest] = set()
    layers: set[Digest] = set()
    for name, desc in descs:
        try:
            blobs.add(desc.digest)
            data = _present(store, desc.digest, f"image {name}: manifest")
            m = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
            blobs |= {m.config.digest, *(x.digest for x in m.layers)}
            config = _present(store, m.config.digest, f"image {name}: config")
            diff_ids = media.diff_ids(config)
            if len(diff_ids) != len(m.layers):
                raise BadManifest(
                    f"{len(m.layers)} layers in the manifest, {len(diff_ids)} DiffIDs in the config"
                )
            for i, (layer, diff_id) in enumerate(zip(m.layers, diff_ids, strict=True)):
                layers.add(diff_id)
                report.layer_blobs.setdefault(diff_id, (layer.digest, layer.media_type))
                if not store.has_blob(layer.digest):
                    report.problems.append(
                        Problem(
                            "image",
                            name,
                            f"image {name}: layer {i + 1} blob {layer.digest} is missing "
                            "(pull the image again)",
                        )
                    )
        except (StoreError, KeyError, ValueError) as exc:
            report.problems.append(Problem("image", name, f"image {name}: {exc}"))
    return blobs, layers


def _present(store: Store, digest: Digest, what: str) -> bytes:
    if not store.has_blob(digest):
        raise StoreError(f"{what} blob {digest} is missing")
    return store.read_blob(digest, verify=False)  # the blob check says whether it is intact


# ----- unpacked layers ---------------------------------------------------------------------
def _check_layers(
    store: Store, only: set[Digest] | None, report: Report, progress: Progress
) -> None:
    for blob_file in sorted(store.diffids.iterdir()):  # recorded blob → DiffID mappings
        diff_id = store.verified_diff_id(Digest("sha256", blob_file.name))
        if diff_id is not None and store.has_blob(Digest("sha256", blob_file.name)):
            report.layer_blobs.setdefault(diff_id, (Digest("sha256", blob_file.name), ""))
    if only is None:
        names = sorted(p.name for p in store.layers.iterdir() if not p.name.startswith("."))
    else:
        names = sorted(d.hex for d in only)
    for name in names:
        if not _HEX64.match(name):
            report.notes.append(Problem("layer", name, f"stray entry {store.layers / name}"))
            continue
        diff_id = Digest("sha256", name)
        if not (store.layers / name).exists():
            report.notes.append(
                Problem(
                    "layer",
                    str(diff_id),
                    f"layer {diff_id} is not unpacked yet (a mount unpacks it from its blob)",
                )
            )
            continue
        if not store.has_layer(diff_id):
            report.notes.append(
                Problem(
                    "layer",
                    str(diff_id),
                    f"layer {diff_id}: an unfinished unpack "
                    "(debris: `layer gc` or the next pull replaces it)",
                )
            )
            continue
        report.checked["layers"] += 1
        check_layer(store, diff_id, report, progress)


def check_layer(store: Store, diff_id: Digest, report: Report, progress: Progress) -> None:
    """Compare one complete layer with its fingerprints; findings go to `report`."""
    fp_path = store.layers / diff_id.hex / fingerprints.FILE_NAME
    fix = diff_id if diff_id in report.layer_blobs else None
    label = f"layer {diff_id.short}"
    try:
        total = sum(e.size for e in fingerprints.read(fp_path) if e.digest)
    except FileNotFoundError:
        report.notes.append(
            Problem(
                "fingerprints",
                str(diff_id),
                f"{label}: no fingerprints (unpacked before they were recorded); "
                "`layer fsck --repair` makes them from its blob",
                fix,
            )
        )
        return
    except fingerprints.FingerprintsDamaged as exc:
        report.problems.append(Problem("fingerprints", str(diff_id), f"{label}: {exc}", fix))
        return
    found: list[str] = []
    progress.start(label, total)
    root_fd = os.open(store.layer_dir(diff_id), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    counted = {"entries": 0, "bytes": 0}

    def digest_of(dir_fd: int, name: bytes, st: os.stat_result) -> bytes:
        counted["bytes"] += st.st_size
        return fingerprints.hash_file(dir_fd, name, progress.advance)

    def walked() -> Iterable[fingerprints.Entry]:
        for e in fingerprints.walk(root_fd, digest_of):
            counted["entries"] += 1
            yield e

    try:
        for d in fingerprints.compare(fingerprints.read(fp_path), walked()):
            path = os.fsdecode(d.path) or "/"
            if d.kind == "changed":
                found.append(f"changed {path}: {d.what}")
            else:
                more = f", and {d.below} entries below it" if d.below else ""
                found.append(f"{d.kind} {path} ({d.what}{more})")
    except fingerprints.FingerprintsDamaged as exc:
        found.append(str(exc))
    except OSError as exc:
        found.append(f"cannot read the tree: {exc}")
    finally:
        os.close(root_fd)
        progress.finish()
    report.checked["entries"] += counted["entries"]
    report.checked["content_bytes"] += counted["bytes"]
    for line in found:
        report.problems.append(Problem("layer", str(diff_id), f"{label}: {line}", fix))


# ----- mount records and debris -------------------------------------------------------------
def _check_records(
    store: Store,
    records: list[mountrecords.MountRecord],
    report: Report,
    mount_state: MountState | None,
) -> None:
    for rec in records:
        report.checked["mounts"] += 1
        where = f"mount {rec.name}"
        if not store.has_blob(rec.image.digest):
            report.problems.append(
                Problem("mount", rec.name, f"{where}: its image {rec.digest} is missing")
            )
        if not rec.read_only:
            for sub in (rec.upper, rec.work):
                if not sub.is_dir() or sub.is_symlink():
                    report.problems.append(
                        Problem("mount", rec.name, f"{where}: {sub} is missing or not a directory")
                    )
        state = mount_state(rec) if mount_state is not None else None
        if state == "dead":
            report.problems.append(
                Problem(
                    "mount",
                    rec.name,
                    f"{where} on {rec.mountpoint}: its daemon is gone but the mount is still "
                    f"in the mount table (`layer umount {rec.name}`)",
                )
            )


def _notes_on_debris(store: Store, report: Report) -> None:
    for p in sorted(store.layers.iterdir()):
        if p.name.startswith(".tmp-"):
            report.notes.append(
                Problem("layer", p.name, f"{p}: debris of an interrupted unpack (`layer gc`)")
            )
    for p in sorted(store.ingest_dir.iterdir()):
        if p.name.endswith(".lock"):
            continue
        report.notes.append(Problem("ingest", p.name, f"{p}: ingest debris (`layer gc`)"))

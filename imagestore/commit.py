"""Commit: an upper directory over an image's layers → a new layer, config, manifest and tag.

    commit(store, upper, lowers, base_image, new_name, ...) -> manifest Digest
    parse_change("CMD ...") -> (key, value)      the Dockerfile-style --change edits

Lifecycle (DESIGN.md's store rules):
  - One streaming pass: `changeset.write_changeset` writes the tar into a `LayerStream`, whose
    thread hashes the uncompressed bytes (the DiffID) and compresses them (gzip without
    timestamp or name, zstd, or none) into `store.ingest()`, which hashes the blob and
    renames it into blobs/;
    and every member it writes is applied at once to the new layer's unpacked directory
    (`layerbuild`: the tree unpacking the blob would give, file data copied from the upper),
    so that the new image mounts without a pull and the blob is never read back.
    Files and symlinks the upper holds exactly as the lower ones they cover (a reinstalled
    package) are left out (`unchanged`, with the lower layers' fingerprints), as umoci does.
  - Then, optionally, the self-check (`verify`), the config (diff_ids appended, a history
    entry, the --change edits), the manifest (same media-type family as the base; a Docker
    base with zstd or no compression becomes OCI), the unpacked layer published (unless the
    store has it already), and last the tag, in a `store.transaction()`.
  - Atomic: an exception anywhere (KeyboardInterrupt included) before the tag removes every
    blob and unpacked layer this commit created (and nothing else); no tag is written.  The
    tag is the last write, after `before_tag` (the caller's last check) succeeded.
    Reproducible: with `source_date_epoch` the same upper gives the same manifest digest.
The self-check reads and writes through `fsat.PLAIN` (openat chains), so paths past PATH_MAX
— an upper or a store located deep enough — are checked like any other.
Concurrency: the caller keeps the upper still (a live mount holds mutations).  Two commits
may run at once; only the tag step takes the store lock.  A blob this commit created is
removed on failure even if another process happened to write the same bytes meanwhile (a
risk only for identical configs, which need identical timestamps).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unionfs import markers
from unionfs.fsat import PLAIN
from unionfs.stack import LayerStack, Node

from . import changeset, fingerprints, media, tarapply
from .digest import Digest
from .errors import StoreError
from .layerbuild import LayerBuild
from .layerstream import LayerStream
from .store import Store, check_tag_name
from .unchanged import Unchanged
from .unpack import apply_blob, remove_tree

log = logging.getLogger(__name__)

CREATED_BY = "layer commit"
COMPRESSIONS = ("gzip", "zstd", "none")
_OCI_OF_DOCKER = {
    media.DOCKER_LAYER: media.OCI_LAYER,
    media.DOCKER_LAYER_GZIP: media.OCI_LAYER_GZIP,
}


class BadChange(StoreError):
    """A --change instruction that does not parse or is not supported."""


class VerifyFailed(StoreError):
    """The committed layer, applied onto the lower layers, does not reproduce the view."""


# ----- --change ----------------------------------------------------------------------------
def parse_change(text: str) -> tuple[str, Any]:
    """`CMD ["a","b"]` / `CMD a b` (→ /bin/sh -c), ENTRYPOINT likewise, `ENV k=v …` (or
    `ENV k v`), `LABEL k=v …`, `WORKDIR /x`, `USER u`.  Returns (config key, value)."""
    word, _, rest = text.strip().partition(" ")
    op, rest = word.upper(), rest.strip()
    if not rest:
        raise BadChange(f"--change {text!r}: {op or 'it'} needs a value")
    if op in ("CMD", "ENTRYPOINT"):
        return ("Cmd" if op == "CMD" else "Entrypoint"), _command(text, rest)
    if op in ("ENV", "LABEL"):
        return ("Env" if op == "ENV" else "Labels"), _pairs(text, op, rest)
    if op == "WORKDIR":
        return "WorkingDir", rest
    if op == "USER":
        return "User", rest
    raise BadChange(
        f"--change {text!r}: unsupported instruction {word!r} "
        "(CMD, ENTRYPOINT, ENV, LABEL, WORKDIR, USER)"
    )


def _command(text: str, rest: str) -> list[str]:
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            raise BadChange(f"--change {text!r}: not a JSON array of strings") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadChange(f"--change {text!r}: not a JSON array of strings")
        return value
    return ["/bin/sh", "-c", rest]


def _pairs(text: str, op: str, rest: str) -> dict[str, str]:
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise BadChange(f"--change {text!r}: {exc}") from None
    if "=" not in words[0]:
        if len(words) < 2:
            raise BadChange(f"--change {text!r}: {op} wants key=value")
        return {words[0]: rest[len(rest.split(None, 1)[0]) :].strip()}
    out = {}
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise BadChange(f"--change {text!r}: {w!r} is not key=value")
        out[key] = value
    return out


def apply_changes(config: dict[str, Any], edits: list[tuple[str, Any]]) -> None:
    """Apply parsed --change edits to an image config's `config` object, in order."""
    cfg = config.setdefault("config", {}) or {}
    config["config"] = cfg
    for key, value in edits:
        if key == "Env":
            env = [e for e in cfg.get("Env") or [] if e.partition("=")[0] not in value]
            cfg["Env"] = env + [f"{k}={v}" for k, v in value.items()]
        elif key == "Labels":
            cfg["Labels"] = {**(cfg.get("Labels") or {}), **value}
        else:
            cfg[key] = value


# ----- streaming the layer -----------------------------------------------------------------
def _write_layer(
    store: Store,
    created: list[Digest],
    build: LayerBuild,
    upper: Path,
    lowers: list[Path],
    compress: str,
    sde: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Digest, int, Digest]:
    """Stream the changeset into the store, and its members into `build`; returns (blob
    digest, size, DiffID) and adds the blob to `created` unless the store had it already."""
    same = Unchanged(lowers, [_fingerprints_file(store, p) for p in lowers])
    with store.ingest() as ing:
        stream = LayerStream(ing.write, compress, progress)
        try:
            changeset.write_changeset(upper, lowers, stream, sde, build.add, same)  # type: ignore[arg-type]
            build.end()  # the layer's directory is finished while the blob is
            diff_id, digest = stream.close()
        finally:
            stream.abort()  # a no-op once closed; else the ingest is not written to any more
        size = ing.offset
        existed = store.has_blob(digest)
        blob = ing.commit()
    if not existed:
        created.append(blob)
    if same.left_out:
        log.info("left out %d files the same as below", same.left_out)
    return blob, size, diff_id


def _fingerprints_file(store: Store, lower: Path) -> Path | None:
    """A store layer's fingerprints (`layers/<hex>/diff` → `layers/<hex>/fingerprints`)."""
    diff = Path(os.path.abspath(lower))
    if diff.name != "diff" or Path(os.path.abspath(store.layers)) != diff.parent.parent:
        return None
    return diff.parent / fingerprints.FILE_NAME


# ----- commit ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitOptions:
    """How to commit (umoci's UnpackOptions style: one value, a comment per field)."""

    # the history entry's comment (`layer commit -m`)
    message: str | None = None
    # the config's and the history entry's author (`layer commit --author`)
    author: str | None = None
    # Dockerfile-style config edits: CMD, ENTRYPOINT, ENV, WORKDIR, LABEL, USER
    changes: tuple[str, ...] = ()
    # the new layer's compression: one of COMPRESSIONS
    compress: str = "gzip"
    # SOURCE_DATE_EPOCH: clamps times in the tar and dates the config, for reproducible blobs
    source_date_epoch: int | None = None
    # re-apply the layers to a plain directory and compare (the self-check, `--verify`)
    verify: bool = False
    # with verify: compare with this directory (a live mount) instead of LayerStack's model
    merged_view: Path | None = None
    # runs once everything but the tag is written (a live mount's thaw, which must succeed
    # for the snapshot to count); if it raises, the commit is undone and nothing is tagged
    before_tag: Callable[[], None] | None = None
    # told of every n bytes of the uncompressed layer tar as it is written (a progress bar)
    progress: Callable[[int], None] | None = None


def commit(
    store: Store,
    upper: Path,
    lowers: list[Path],
    base_image: str | media.Descriptor,
    new_name: str,
    options: CommitOptions = CommitOptions(),  # noqa: B008 (frozen: one shared default is safe)
) -> Digest:
    """Commit `upper` over `lowers` (base first: the layers of `base_image`, a name or a
    manifest descriptor) as `new_name`; returns the new manifest's digest.  See
    CommitOptions for the knobs and the module docstring for the guarantees."""
    o = options
    message, author, changes, compress = o.message, o.author, o.changes, o.compress
    source_date_epoch, verify, merged_view = o.source_date_epoch, o.verify, o.merged_view
    before_tag, progress = o.before_tag, o.progress
    if compress not in COMPRESSIONS:
        raise StoreError(f"unknown compression {compress!r} (gzip, zstd, none)")
    check_tag_name(new_name)
    edits = [parse_change(c) for c in changes]
    desc = store.resolve(base_image) if isinstance(base_image, str) else base_image
    data = store.read_blob(desc.digest)
    base = media.parse_manifest(data, media.media_type_of(data, desc.media_type))
    config = store.read_json(base.config.digest)
    docker = base.media_type == media.DOCKER_MANIFEST and compress == "gzip"
    created: list[Digest] = []
    build: LayerBuild | None = None
    new_layer = False
    try:
        build = LayerBuild(store)
        blob, size, diff_id = _write_layer(
            store, created, build, upper, lowers, compress, source_date_epoch, progress
        )
        store.record_diff_id(blob, diff_id)  # hashed while it was compressed: verified
        if verify:
            check(store, base, blob, _layer_type(compress, docker), upper, lowers, merged_view)
        new_config = _config(config, diff_id, message, author, edits, source_date_epoch)
        cfg_digest, cfg_size = _put_json(store, created, new_config)
        manifest = _manifest(base, docker, cfg_digest, cfg_size, blob, size, compress)
        man_digest, man_size = _put_json(store, created, manifest)
        build.finish()  # its child finished the directory meanwhile
        new_layer = build.publish(diff_id)
        if before_tag is not None:
            before_tag()
        with store.transaction() as txn:
            txn.tag(new_name, media.Descriptor(manifest["mediaType"], man_digest, man_size))
    except BaseException:
        if build is not None:
            build.discard()
        for d in created:
            with contextlib.suppress(FileNotFoundError):
                store.blob_path(d).unlink()
        if new_layer:
            with contextlib.suppress(FileNotFoundError):
                (store.layers / diff_id.hex / "complete").unlink()
            remove_tree(store.layers / diff_id.hex)
        raise
    return man_digest


def _put_json(store: Store, created: list[Digest], obj: Any) -> tuple[Digest, int]:
    data = json.dumps(obj, separators=(",", ":")).encode()
    existed = store.has_blob(Digest.of(data))
    digest = store.put_bytes(data)
    if not existed:
        created.append(digest)
    return digest, len(data)


def _layer_type(compress: str, docker: bool) -> str:
    if docker:
        return media.DOCKER_LAYER_GZIP
    return {"gzip": media.OCI_LAYER_GZIP, "zstd": media.OCI_LAYER_ZSTD}.get(
        compress, media.OCI_LAYER
    )


def _rfc3339(sde: int | None) -> str:
    when = sde if sde is not None else time.time()
    dt = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (
        "Z" if sde is not None else f".{dt.microsecond:06d}Z"
    )


def _config(
    base: dict[str, Any],
    diff_id: Digest,
    message: str | None,
    author: str | None,
    edits: list[tuple[str, Any]],
    sde: int | None,
) -> dict[str, Any]:
    config = copy.deepcopy(base)
    created = _rfc3339(sde)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), str(diff_id)]
    entry: dict[str, Any] = {"created": created, "created_by": CREATED_BY}
    if author:
        entry["author"] = author
        config["author"] = author
    if message:
        entry["comment"] = message
    config["history"] = [*(config.get("history") or []), entry]
    config["created"] = created
    apply_changes(config, edits)
    return config


def _manifest(
    base: media.Manifest,
    docker: bool,
    cfg: Digest,
    cfg_size: int,
    blob: Digest,
    size: int,
    compress: str,
) -> dict[str, Any]:
    layers = [d.to_json() for d in base.layers]
    if not docker:
        for d in layers:
            d["mediaType"] = _OCI_OF_DOCKER.get(d["mediaType"], d["mediaType"])
    layers.append({"mediaType": _layer_type(compress, docker), "digest": str(blob), "size": size})
    return {
        "schemaVersion": 2,
        "mediaType": media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST,
        "config": {
            "mediaType": media.DOCKER_CONFIG if docker else media.OCI_CONFIG,
            "digest": str(cfg),
            "size": cfg_size,
        },
        "layers": layers,
    }


# ----- the self-check ----------------------------------------------------------------------
def check(
    store: Store,
    base: media.Manifest,
    blob: Digest,
    media_type: str,
    upper: Path,
    lowers: list[Path],
    merged_view: Path | None,
) -> None:
    """Apply the base's layers and the new one to a plain directory and compare it with
    `merged_view` (or, without one, with the union of upper and lowers); VerifyFailed.
    `merged_view` is read through, so it must not be a mount that is frozen meanwhile (a
    close there may wait for WRITE requests the frozen daemon holds: unionfs/control.py)."""
    tmp = store.ingest_dir / f"verify-{os.urandom(8).hex()}"
    os.mkdir(tmp, 0o700)
    try:
        for d in base.layers:
            apply_blob(store, d.digest, tmp, tarapply.PLAIN)
        apply_blob(store, blob, tmp, tarapply.PLAIN)
        got = _snapshot_dir(tmp)
        want = _snapshot_dir(merged_view) if merged_view else _snapshot_stack(upper, lowers)
    finally:
        remove_tree(tmp)
    problems = [
        f"{os.fsdecode(p)}: {got.get(p)!r} != {want.get(p)!r}"
        for p in sorted(set(got) | set(want))
        if got.get(p) != want.get(p)
    ]
    if problems:
        raise VerifyFailed(
            f"the new layer does not reproduce the view ({len(problems)} differences): "
            + "; ".join(problems[:5])
        )


Observed = tuple[Any, ...]


def _observe(path: bytes, st: os.stat_result, xattrs: list[bytes]) -> Observed | None:
    """What the comparison looks at (no times, no link counts; sockets are not in tars)."""
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFSOCK:
        return None
    content: Any = None
    if fmt == stat.S_IFREG:
        h = hashlib.sha256()
        with os.fdopen(PLAIN.open(path, os.O_RDONLY), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        content = h.hexdigest()
    elif fmt == stat.S_IFLNK:
        content = PLAIN.readlink(path)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        content = st.st_rdev
    attrs = tuple(
        sorted((n, PLAIN.getxattr(path, n)) for n in xattrs if not markers.is_internal_xattr(n))
    )
    return (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, attrs)


def _snapshot_dir(top: Path) -> dict[bytes, Observed]:
    out: dict[bytes, Observed] = {}
    base = os.fsencode(top)
    todo = [b""]  # directories still to read (iterative: any depth)
    while todo:
        rel = todo.pop()
        with PLAIN.scandir(base + rel) as it:
            names = sorted(e.name for e in it)
        for name in names:
            r = rel + b"/" + os.fsencode(name)
            st = PLAIN.lstat(base + r)
            xattrs = [os.fsencode(n) for n in PLAIN.listxattr(base + r)]
            obs = _observe(base + r, st, xattrs)
            if obs is not None:
                out[r] = obs
            if stat.S_ISDIR(st.st_mode):
                todo.append(r)
    return out


def _snapshot_stack(upper: Path, lowers: list[Path]) -> dict[bytes, Observed]:
    """The union view as `unionfs.stack.LayerStack` (the mount's own model) computes it."""
    stack = LayerStack([str(p) for p in reversed(lowers)], str(upper))
    out: dict[bytes, Observed] = {}
    todo: list[tuple[Node, bytes]] = [(stack.root, b"")]
    while todo:
        node, rel = todo.pop()
        for name in sorted(stack.listing(node)):
            child = stack.lookup(node, name)
            r = rel + b"/" + name
            real = stack.real_path(child)
            obs = _observe(real, stack.stat(child), stack.listxattr(child))
            if obs is not None:
                out[r] = obs
            if child.is_dir:
                todo.append((child, r))
    return out

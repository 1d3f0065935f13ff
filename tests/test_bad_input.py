"""Issue 12, item 13: bad input gets one line, never a traceback.

Property tests (hypothesis) throw random JSON at every document parser and random bytes (and
random tars) at every archive reader; each must succeed or raise a domain error (StoreError,
which the CLI prints as one line), never anything else.  Example tests run the CLI on the
cases the issue lists and check for one `layer: error:` line and an exit code other than 125."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.errors import EXIT_INTERNAL, describe
from imagestore import auth, media, mountrecords
from imagestore.errors import StoreError
from imagestore.sources import _docker_entries, open_source
from imagestore.store import Store
from imagestore.unpack import unpack_layer
from tests import imagedata

LAYER = str(Path(sys.executable).parent / "layer")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "sha256:" + "a" * 64,
            media.OCI_MANIFEST,
            media.OCI_INDEX,
            media.DOCKER_MANIFEST,
            "linux",
            "amd64",
        ]
    )
)
KEYS = [
    "mediaType", "digest", "size", "config", "layers", "manifests", "platform", "annotations",
    "rootfs", "diff_ids", "schemaVersion", "os", "architecture", "image", "image_name",
    "mountpoint", "daemon", "read_only", "token", "access_token", "expires_in", "auths",
    "auth", "Config", "Layers", "RepoTags", "org.opencontainers.image.ref.name",
]  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=25,
)
DESC = {"mediaType": media.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 10}
# documents that are nearly right, with one field replaced by anything
near_misses = st.builds(
    lambda base, key, value: {**base, key: value},
    st.sampled_from(
        [
            {"schemaVersion": 2, "config": DESC, "layers": [DESC]},
            {"schemaVersion": 2, "manifests": [DESC]},
            {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "c" * 64]}},
            DESC,
            {"image": DESC, "image_name": "x", "mountpoint": "/m"},
        ]
    ),
    st.sampled_from(KEYS),
    json_values,
)
documents = st.one_of(json_values, near_misses).map(lambda v: json.dumps(v).encode()) | st.binary(
    max_size=64
)


def domain_error_or_nothing(fn) -> None:
    try:
        fn()
    except StoreError as exc:
        code, message, traceback = describe(exc)
        assert code != EXIT_INTERNAL and not traceback
        assert message and "\n" not in message.strip()


@SETTINGS
@given(doc=documents, mt=st.sampled_from([None, *media.MANIFEST_TYPES, *media.INDEX_TYPES]))
def test_media_parsers(doc, mt):
    domain_error_or_nothing(lambda: media.load(doc))
    domain_error_or_nothing(lambda: media.media_type_of(doc, mt))
    domain_error_or_nothing(lambda: media.parse_manifest(doc, mt or media.OCI_MANIFEST))
    domain_error_or_nothing(lambda: media.index_entries(doc))
    domain_error_or_nothing(lambda: media.diff_ids(doc))
    domain_error_or_nothing(lambda: media.choose_platform(media.index_entries(doc), "linux/amd64"))


@SETTINGS
@given(value=json_values | near_misses)
def test_descriptor(value):
    domain_error_or_nothing(lambda: media.Descriptor.from_json(value))


@SETTINGS
@given(doc=documents)
def test_docker_archive_manifest_json(doc):
    domain_error_or_nothing(lambda: _docker_entries(doc, "docker-archive x"))


@SETTINGS
@given(doc=documents)
def test_store_index_json(tmp_path_factory, doc):
    store = Store.open(tmp_path_factory.mktemp("s"))
    (store.root / "index.json").write_bytes(doc)
    domain_error_or_nothing(store.images)
    domain_error_or_nothing(lambda: store.resolve("x"))
    domain_error_or_nothing(lambda: _tag(store, "y", media.Descriptor.from_json(DESC)))


@SETTINGS
@given(doc=documents)
def test_mount_record(tmp_path_factory, doc):
    store = Store.open(tmp_path_factory.mktemp("s"))
    (store.mounts / "m").mkdir()
    (store.mounts / "m" / "mount.json").write_bytes(doc)
    domain_error_or_nothing(lambda: mountrecords.load(store, "m"))
    domain_error_or_nothing(lambda: mountrecords.all_records(store))


@SETTINGS
@given(doc=documents, status=st.sampled_from([200, 401, 500]))
def test_token_reply(doc, status):
    transport = httpx.MockTransport(lambda req: httpx.Response(status, content=doc))
    with httpx.Client(transport=transport) as client:
        challenge = auth.Challenge("bearer", {"realm": "http://127.0.0.1:1/token"})
        domain_error_or_nothing(lambda: auth.fetch_token(client, challenge, "s", None))


@SETTINGS
@given(doc=documents)
def test_auth_file(tmp_path_factory, monkeypatch, doc):
    path = tmp_path_factory.mktemp("a") / "auth.json"
    path.write_bytes(doc)
    monkeypatch.delenv("LAYER_CREDS", raising=False)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    domain_error_or_nothing(lambda: auth.lookup_credentials("127.0.0.1:5000", "r"))


# ----- archives -----------------------------------------------------------------------------
def pull_source(tmp: Path, text: str) -> None:
    store = Store.open(tmp / "store")
    from imagestore.pull import pull

    pull(store, text)


member_names = st.sampled_from(
    ["index.json", "oci-layout", "manifest.json", "blobs/sha256/" + "a" * 64, "x/layer.tar",
     "../evil", "/abs", "blobs", "./index.json"]
)  # fmt: skip


@st.composite
def random_tars(draw) -> bytes:
    """A tar of random members: documents, links (loops too), devices, FIFOs, dirs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for _ in range(draw(st.integers(0, 6))):
            info = tarfile.TarInfo(draw(member_names))
            kind = draw(st.sampled_from("ffffsldcpD"))
            data = b""
            if kind == "f":
                data = draw(documents)
            elif kind in "sl":
                info.type = tarfile.SYMTYPE if kind == "s" else tarfile.LNKTYPE
                info.linkname = draw(member_names)
            elif kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "c":
                info.type = tarfile.CHRTYPE
            elif kind == "p":
                info.type = tarfile.FIFOTYPE
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    raw = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    return raw if cut is None else raw[:cut]


archives = random_tars() | st.binary(max_size=2048)


@SETTINGS
@given(data=archives, kind=st.sampled_from(["oci-archive", "docker-archive"]))
def test_archive_readers(tmp_path_factory, data, kind):
    tmp = tmp_path_factory.mktemp("ar")
    (tmp / "a.tar").write_bytes(data)
    domain_error_or_nothing(lambda: pull_source(tmp, f"{kind}:{tmp}/a.tar"))


@SETTINGS
@given(
    data=st.binary(max_size=4096) | random_tars(), mt=st.sampled_from(list(media.MANIFEST_TYPES))
)
def test_layer_reader(tmp_path_factory, data, mt):
    store = Store.open(tmp_path_factory.mktemp("s"))
    blob = store.put_bytes(data)
    layer_type = media.OCI_LAYER_GZIP if mt == media.OCI_MANIFEST else media.DOCKER_LAYER
    domain_error_or_nothing(lambda: unpack_layer(store, blob, layer_type, None))


@SETTINGS
@given(index=documents)
def test_oci_layout_index(tmp_path_factory, index):
    tmp = tmp_path_factory.mktemp("l")
    (tmp / "index.json").write_bytes(index)
    domain_error_or_nothing(lambda: open_source(f"oci:{tmp}").manifest())


# ----- the cases of the issue, through the CLI -------------------------------------------
def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode not in (0, EXIT_INTERNAL), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layer: error:"), proc.stderr
    return lines[0]


def layer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAYER, *args], capture_output=True, text=True, timeout=60)


def tamper_layout(root: Path, edit_manifest, edit_index) -> None:
    """Rewrite the (only) manifest of an OCI layout, then index.json, with the two edits."""
    index = json.loads((root / "index.json").read_text())
    desc = index["manifests"][0]
    blob = root / "blobs" / "sha256" / desc["digest"].split(":")[1]
    manifest = json.loads(blob.read_bytes())
    edit_manifest(manifest)
    data = json.dumps(manifest).encode().replace(b"Infinity", b"1e400")
    digest = imagedata._put(root / "blobs" / "sha256", data)
    desc.update(digest=digest, size=len(data))
    edit_index(index)
    (root / "index.json").write_text(json.dumps(index))


def nothing(doc: dict) -> None:
    pass


@pytest.mark.parametrize(
    "edit_manifest, edit_index, field",
    [
        (lambda m: m.update(layers=3), nothing, "'layers'"),
        (lambda m: m.update(layers=None), nothing, "'layers'"),
        (lambda m: m["config"].update(size=float("inf")), nothing, "'size'"),
        (lambda m: m["config"].update(annotations=["a"]), nothing, "'annotations'"),
        (nothing, lambda i: i["manifests"][0].update(platform="linux"), "'platform'"),
        (nothing, lambda i: i.update(manifests=5), "'manifests'"),
        (nothing, lambda i: i.update(manifests=["x"]), "index entry 0"),
    ],
)
def test_cli_bad_oci_documents(tmp_path, edit_manifest, edit_index, field):
    root = tmp_path / "lay"
    imagedata.write_oci_layout(root)
    tamper_layout(root, edit_manifest, edit_index)
    line = one_line(layer("pull", "--root", str(tmp_path / "s"), f"oci:{root}"))
    assert field in line, line


def docker_archive(path: Path, members: dict[str, bytes | tuple[str, str]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type = tarfile.SYMTYPE if data[0] == "sym" else tarfile.LNKTYPE
                info.linkname = data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()


@pytest.mark.parametrize(
    "members, words",
    [
        ({"manifest.json": b"{not json"}, "not JSON"),
        ({"manifest.json": b"7"}, "not a list"),
        ({"manifest.json": b'[{"Layers": []}]'}, "'Config'"),
        ({"manifest.json": b'[{"Config": "c.json", "Layers": 3}]'}, "'Layers'"),
        ({"manifest.json": b'[{"Config": "c.json", "Layers": ["l.tar"]}]', "c.json": CONFIG},
         "lacks l.tar"),
        ({"manifest.json": b'[{"Config": "c.json", "Layers": ["a"]}]', "c.json": CONFIG,
          "a": ("sym", "b"), "b": ("sym", "a")}, "not a regular file"),
        ({"manifest.json": ("sym", "manifest.json")}, "not a regular file"),
    ],
)  # fmt: skip
def test_cli_bad_docker_archives(tmp_path, members, words):
    docker_archive(tmp_path / "a.tar", members)
    line = one_line(
        layer("pull", "--root", str(tmp_path / "s"), f"docker-archive:{tmp_path}/a.tar")
    )
    assert words in line, line


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
def test_cli_archives_tarfile_refuses(tmp_path, kind):
    raw = io.BytesIO()
    imagedata.write_oci_layout(tmp_path / "lay")
    with tarfile.open(fileobj=raw, mode="w") as tf:
        tf.add(tmp_path / "lay", arcname=".")
    data = raw.getvalue()
    for i, bad in enumerate([data[: len(data) // 2], b"\0" * 100 + b"junk" * 300, b"x" * 10]):
        (tmp_path / f"{i}.tar").write_bytes(bad)
        one_line(layer("pull", "--root", str(tmp_path / "s"), f"{kind}:{tmp_path}/{i}.tar"))


def test_cli_damaged_store_index_and_record(tmp_path):
    root = tmp_path / "s"
    Store.open(root)
    (root / "index.json").write_text('{"manifests": [{"annotations": []}]}')
    for cmd in (["images"], ["inspect", "x"], ["gc"], ["rmi", "x"]):
        line = one_line(layer(*cmd, "--root", str(root)))
        assert "index.json" in line, line
    Store.open(tmp_path / "t")
    (tmp_path / "t" / "mounts" / "m").mkdir()
    (tmp_path / "t" / "mounts" / "m" / "mount.json").write_text('{"image": "sha256:x"}')
    line = one_line(layer("ps", "--root", str(tmp_path / "t")))
    assert "mount.json" in line, line
    os.remove(tmp_path / "t" / "mounts" / "m" / "mount.json")


def test_cli_pull_into_a_full_store(tmp_path):
    """A store on a full filesystem: one line that says so and where the store is, and
    nothing half-made: what stays checks out (`fsck`), and no image is tagged."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    src, fs = tmp_path / "lay", tmp_path / "small"
    noise = os.urandom(3 << 20)  # does not compress: more than the 2 MiB filesystem
    imagedata.write_oci_layout(src, [[("big", "file", noise)]])
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "layertest", str(fs)], check=True)
    try:
        root = fs / "s"
        line = one_line(layer("pull", "--root", str(root), f"oci:{src}"))
        assert "No space left on device" in line and str(root) in line, line
        assert layer("fsck", "--root", str(root)).returncode == 0
        images = json.loads(layer("images", "--root", str(root), "--format", "json").stdout)
        assert images == []
    finally:
        subprocess.run(["umount", str(fs)], timeout=30)


@SETTINGS
@given(index=documents)
def test_push_into_an_oci_layout_with_any_index(tmp_path_factory, index):
    from imagestore.push import push

    tmp = tmp_path_factory.mktemp("p")
    store, _ = imagedata.pulled_sample(tmp / "img")
    dest = tmp / "dest"
    dest.mkdir()
    (dest / "index.json").write_bytes(index)
    domain_error_or_nothing(lambda: push(store, "base", f"oci:{dest}:x"))


def _tag(store: Store, name: str, desc: media.Descriptor) -> None:
    with store.transaction() as txn:
        txn.tag(name, desc)

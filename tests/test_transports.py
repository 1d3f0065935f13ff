"""Transport references: one parser for pull and push; the store's transaction API."""

from pathlib import Path

import pytest

from imagestore import transports
from imagestore.errors import BadReference
from imagestore.sources import open_source
from imagestore.store import Store


@pytest.mark.parametrize(
    "text, kind, path, ref",
    [
        ("oci:/l:v1", transports.OCI, Path("/l"), "v1"),
        ("oci:/l", transports.OCI, Path("/l"), None),
        ("oci-archive:a.tar:v2", transports.OCI_ARCHIVE, Path("a.tar"), "v2"),
        ("docker-archive:s.tar:app:1", transports.DOCKER_ARCHIVE, Path("s.tar"), "app:1"),
        ("docker://localhost:5000/a/b:1", transports.DOCKER, None, "localhost:5000/a/b:1"),
        ("alpine", transports.DOCKER, None, "alpine"),
    ],
)
def test_parse(text, kind, path, ref):
    assert transports.parse(text) == transports.TransportRef(kind, path, ref)


@pytest.mark.parametrize(
    "text", ["dir:/x", "containers-storage:img", "docker-daemon:img:1", "http://h/x"]
)
def test_unsupported_transports_are_refused(text):
    """push.push parses its destination with the same transports.parse."""
    with pytest.raises(BadReference, match="unsupported transport"):
        transports.parse(text)
    with pytest.raises(BadReference, match="unsupported transport"):
        open_source(text)


def test_tag_needs_a_transaction_and_transactions_do_not_nest(tmp_path):
    store = Store.open(tmp_path / "s")
    assert not hasattr(store, "tag")  # only a Transaction tags
    with store.transaction() as txn:
        with pytest.raises(RuntimeError, match="do not nest"), store.transaction():
            pass
    with pytest.raises(RuntimeError, match="after its block"):
        txn.untag("x")
    from imagestore import mountrecords

    with pytest.raises(RuntimeError, match="outside a transaction"):
        mountrecords.remove(store, "x")

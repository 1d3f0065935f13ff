"""Domain exceptions of the image store.  The CLI maps each class to an exit code in one place."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: a failure a user can act on; the message names the problem."""


class BadReference(StoreError):
    """An image reference or transport that cannot be parsed."""


class ImageNotFound(StoreError):
    """The image (tag, digest or file) does not exist where it was looked for."""


class BlobNotFound(StoreError):
    pass


class DigestMismatch(StoreError):
    """Content did not hash to the digest (or size) it was announced with."""


class CorruptLayer(StoreError):
    """A layer that cannot be unpacked safely (hostile or broken tar, bad compression)."""


class RegistryError(StoreError):
    """The registry answered with an error, or could not be reached."""


class AuthError(RegistryError):
    """The registry refused our credentials (or demanded some we do not have)."""


class DamagedStore(StoreError):
    """A file of the store itself (index.json, a mount record) does not parse or lacks a
    field; the message names the file and the field."""


class BadArchive(StoreError):
    """An oci-archive or docker-archive that cannot be read safely (not a tar, a member that
    is missing, not a regular file, oversized, a document that does not parse)."""


class StoreBusy(StoreError):
    """Another `layer` process holds the store lock."""

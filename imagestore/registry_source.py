"""The `docker://` source: a registry repository, through RegistryClient.

Thin: the reference names host, repository and tag/digest; the client does HTTP, auth,
negotiation, verification and resume.  fetch_blob may be called from several threads.
"""

from __future__ import annotations

from .digest import Digest
from .media import Descriptor
from .progress import Progress
from .reference import parse_reference
from .registry import RegistryClient
from .store import Store
from .transfer import Limits


class RegistrySource:
    def __init__(
        self,
        text: str,
        *,
        tls_verify: bool = True,
        creds: tuple[str, str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.ref = parse_reference(text)
        self.client = RegistryClient(
            self.ref.host, tls_verify=tls_verify, creds=creds, limits=limits
        )
        self.default_name = str(self.ref)

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, Digest]:
        if ref is None:
            ref = str(self.ref.digest) if self.ref.digest else (self.ref.tag or "latest")
        return self.client.get_manifest(self.ref.repository, ref)

    def fetch_blob(self, desc: Descriptor, store: Store, progress: Progress | None) -> Digest:
        return self.client.fetch_blob(self.ref.repository, desc.digest, desc.size, store, progress)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

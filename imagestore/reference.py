"""Reference: a parsed docker image reference, `[HOST[:PORT]/]NAME[:TAG][@DIGEST]`.

The grammar and the defaults are those of docker and skopeo (distribution's `reference`
package, `ParseNormalizedNamed`):

  - the first `/`-separated component is a registry host when it contains `.` or `:`, is
    `localhost`, or has upper-case letters; otherwise the host is Docker Hub;
  - on Docker Hub a one-component name lives under `library/` (`alpine` → `library/alpine`);
    `docker.io`, `index.docker.io` and `registry-1.docker.io` all name Docker Hub, whose API
    endpoint is `registry-1.docker.io` (that is `Reference.host`) while the canonical text
    keeps the familiar `docker.io/...`;
  - name components are lower-case `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`;
    the whole name (host included) is at most 255 characters;
  - a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; with neither tag nor digest the tag is
    `latest`; with both, the digest is what identifies the image and the tag is kept as a name.

Transports (`docker://`, `oci:`) are not this module's business: `sources` strips them.
Pure and immutable; thread-safe.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .digest import Digest
from .errors import BadReference

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_HOST = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
NAME_MAX = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOSTLABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(rf"(?:{_HOSTLABEL}(?:\.{_HOSTLABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")


def split_host_port(host: str) -> tuple[str, int | None]:
    """`127.0.0.1:5000` → ("127.0.0.1", 5000); `[::1]:5000` → ("::1", 5000)."""
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return addr, int(port) if port else None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1, with or without a port."""
    name, _ = split_host_port(host)
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def canonical_host(host: str) -> str:
    """The API endpoint for a registry host: Docker Hub's aliases become registry-1.docker.io."""
    return DOCKER_HUB_HOST if host.lower() in _DOCKER_HUB_ALIASES else host


def check_repository(repo: str) -> str:
    """Return `repo` if it is a valid repository path (lower-case components), else raise."""
    if not REPOSITORY_RE.fullmatch(repo):
        if repo.lower() != repo and REPOSITORY_RE.fullmatch(repo.lower()):
            raise BadReference(f"repository name must be lowercase: {repo!r}")
        raise BadReference(
            f"invalid repository name {repo!r}: components are lower-case letters and digits, "
            "separated by '.', '_', '__' or '-', joined by '/'"
        )
    return repo


@dataclass(frozen=True)
class Reference:
    host: str  # the registry API endpoint, e.g. registry-1.docker.io or 127.0.0.1:5000
    repository: str  # e.g. library/alpine
    tag: str | None = None
    digest: Digest | None = None

    @property
    def domain(self) -> str:
        """The host as people write it: `docker.io` for Docker Hub."""
        return DOCKER_HUB_DOMAIN if self.host == DOCKER_HUB_HOST else self.host

    @property
    def name(self) -> str:
        """`domain/repository`, without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    @property
    def registry_url(self) -> str:
        """`https://HOST`, or `http://HOST` for a loopback registry."""
        return self.base_url()

    def base_url(self, insecure: bool = False) -> str:
        """The registry's base URL; plain http for loopback hosts or when `insecure`."""
        scheme = "http" if insecure or is_loopback(self.host) else "https"
        return f"{scheme}://{self.host}"

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse a docker reference, applying docker's defaults.  Raises BadReference."""
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise BadReference(f"invalid image reference {text!r}: empty or contains whitespace")
    if "://" in text:
        raise BadReference(
            f"invalid image reference {text!r}: a reference has no URL scheme "
            "(write HOST[:PORT]/NAME[:TAG])"
        )
    rest, at, digest_text = text.partition("@")
    digest = None
    if at:
        if not digest_text:
            raise BadReference(f"invalid image reference {text!r}: empty digest after '@'")
        try:
            digest = Digest.parse(digest_text)
        except BadReference as exc:
            raise BadReference(f"invalid image reference {text!r}: {exc}") from None
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not TAG_RE.fullmatch(tag):
            raise BadReference(
                f"invalid tag {tag!r} in {text!r}: up to 128 of letters, digits, '_', '.', '-' "
                "(not starting with '.' or '-')"
            )
    if not rest:
        raise BadReference(f"invalid image reference {text!r}: no repository name")
    host, repo = _split_host(rest, text)
    if len(f"{host}/{repo}") > NAME_MAX:
        raise BadReference(f"invalid image reference {text!r}: name longer than {NAME_MAX}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host, repo, tag, digest)


def _split_host(name: str, text: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    is_host = slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_host:
        host, repo = DOCKER_HUB_HOST, name
    else:
        if not _HOST_RE.fullmatch(first):
            raise BadReference(f"invalid registry host {first!r} in {text!r}")
        host, repo = canonical_host(first), remainder
        if not repo:
            raise BadReference(f"invalid image reference {text!r}: no repository name")
    check_repository(repo)
    if host == DOCKER_HUB_HOST and "/" not in repo:
        repo = f"library/{repo}"
    return host, repo

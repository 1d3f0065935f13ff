"""The real registry tools the store benchmark and the tests both run: `docker-registry`
(the CNCF distribution registry) and skopeo.

  - `running_registry(workdir, htpasswd=…)` starts docker-registry on 127.0.0.1 on a free port
    with its storage under `workdir`, optionally behind htpasswd (bcrypt, made by
    `htpasswd -Bbn`), waits until `/v2/` answers (with a deadline, checking the process is
    alive) and always stops it in `finally`: terminate, then kill.
  - `skopeo_copy(src, dst, …)` runs `skopeo --insecure-policy copy`.
A missing tool raises ToolMissing; the tests pass `find=` to skip or fail instead
(tests/registry_util.py).  Each call owns its own process; nothing is shared.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

START_DEADLINE = 15.0
STOP_DEADLINE = 5.0

Finder = Callable[[str, str], str]  # (tool, Debian package) -> its path


class ToolMissing(RuntimeError):
    pass


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} is not installed (apt: {package})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----- the real registry ------------------------------------------------------------------
@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def registry_config(storage: Path, port: int, htpasswd_file: Path | None) -> dict[str, object]:
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if htpasswd_file is not None:
        config["auth"] = {"htpasswd": {"realm": "layer-test", "path": str(htpasswd_file)}}
    return config


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    *,
    htpasswd: tuple[str, str] | None = None,
    config_hook: Callable[[dict[str, object]], None] | None = None,
    find: Finder = need_tool,
) -> Iterator[Registry]:
    """A real docker-registry on 127.0.0.1 (a free port), stopped when the block ends."""
    binary = find("docker-registry", "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    htpasswd_file = None
    if htpasswd is not None:
        tool = find("htpasswd", "apache2-utils")
        out = subprocess.run(
            [tool, "-Bbn", *htpasswd], check=True, capture_output=True, timeout=30
        ).stdout
        htpasswd_file = workdir / "htpasswd"
        htpasswd_file.write_bytes(out)
    for _ in range(3):  # a free port can be taken between our probe and the bind
        port = free_port()
        config = registry_config(workdir / "storage", port, htpasswd_file)
        if config_hook is not None:
            config_hook(config)
        # JSON is YAML: no YAML library needed, and paths need no escaping rules of their own
        config_file = workdir / "config.yml"
        config_file.write_text(json.dumps(config, indent=2))
        log = workdir / "registry.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [binary, "serve", str(config_file)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            ready = _wait_ready(proc, f"127.0.0.1:{port}", log)
            if not ready:
                continue  # address in use: another port
            yield Registry(f"127.0.0.1:{port}", workdir / "storage", log, proc)
            return
        finally:
            stop_process(proc)
    raise RuntimeError("docker-registry could not bind a free port three times")


def _wait_ready(proc: subprocess.Popen[bytes], host: str, log: Path) -> bool:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if "address already in use" in text:
                return False
            raise RuntimeError(f"docker-registry exited with {proc.returncode}:\n{text}")
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 from an htpasswd registry: it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"docker-registry did not answer on {host} within {START_DEADLINE}s:\n"
        + log.read_text(errors="replace")
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_DEADLINE)


def skopeo_copy(src: str, dst: str, *args: str, find: Finder = need_tool) -> None:
    """`skopeo --insecure-policy copy ARGS SRC DST`; raises with skopeo's stderr on failure."""
    skopeo = find("skopeo", "skopeo")
    cmd = [skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false", *args, src, dst]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")

"""A private podman: its own storage.conf and containers.conf under one directory, per engine.

Used by tests/test_podman.py (layerfs against kernel overlay, listing by listing) and by the
benchmark rows S3-S5.  Engines: `layerfs` (mount_program = the layerfs of the running venv),
`fuse-overlayfs` (mount_program = /usr/bin/fuse-overlayfs) and `kernel` (the overlay driver
mounting kernel overlayfs itself).  Nothing touches the machine's own podman state: graphroot,
runroot, tmp_dir, volumes and the events log all live under the directory given.

Environment quirks met here, and how they are handled:
  - setrlimit may be refused in a sandbox: `default_ulimits` pins RLIMIT_NOFILE/NPROC to
    values the caller already has, so runc never raises a limit;
  - no systemd: cgroup_manager = "cgroupfs", events_logger = "file";
  - no network: every container runs with --network none, images come from a local OCI layout;
  - PID 1 may not reap orphans (conmon and daemonized mount programs are orphans by design):
    `Reaper` makes this process a child subreaper while podman runs and reaps the zombies
    reparented to it between commands.
Single-threaded; root only (kernel overlay and runc as root).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from imagestore.layout_writer import write_oci_image

LAYERFS = str(Path(sys.executable).parent / "layerfs")
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
ENGINES = ("layerfs", "fuse-overlayfs", "kernel")
TIMEOUT = 120.0
BUSYBOX = "/bin/busybox"  # apt: busybox-static
APPLETS = ("sh", "ls", "cat", "echo", "id", "mkdir", "rm", "mv", "ln", "touch", "true",
           "chmod", "stat", "sed", "sync", "find", "sleep", "cp", "test")  # fmt: skip
_PR_SET_CHILD_SUBREAPER = 36
_ALIASES = itertools.count()  # names of the symlinks load_image pulls through
MTIME = 1_600_000_000


def missing_tools(engines: tuple[str, ...] = ENGINES) -> list[str]:
    """What this machine lacks to run podman on `engines` (empty: all there)."""
    need = ["podman", "runc"]
    out = [t for t in need if shutil.which(t) is None]
    if not os.path.exists(BUSYBOX):
        out.append(f"{BUSYBOX} (apt: busybox-static)")
    if "fuse-overlayfs" in engines and not os.path.exists(FUSE_OVERLAYFS):
        out.append(FUSE_OVERLAYFS)
    if "layerfs" in engines and not os.path.exists(LAYERFS):
        out.append(LAYERFS)
    return out


class Reaper:
    """While active this process is a child subreaper; `reap()` collects zombie children that
    no subprocess call is waiting for (call it between commands, never during one)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def __enter__(self) -> Reaper:
        self._libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()
        self._libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    @staticmethod
    def reap() -> int:
        me, count = os.getpid(), 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(me) and fields.get("State", "")[:1] == "Z":
                try:
                    os.waitpid(int(entry.name), os.WNOHANG)
                    count += 1
                except ChildProcessError:
                    pass
        return count


@dataclass
class Podman:
    """One private podman over `root` with storage engine `engine`."""

    root: Path
    engine: str
    # kernel only: diff and commit by comparing trees (containers/storage's "naive diff"), as
    # it always does for a mount_program storage, instead of reading the upper directly
    naive_diff: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine}")
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("graph", "run", "tmp", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        self.storage_conf = self.root / "storage.conf"
        self.containers_conf = self.root / "containers.conf"
        program = {"layerfs": LAYERFS, "fuse-overlayfs": FUSE_OVERLAYFS}.get(self.engine)
        overlay = f'mount_program = "{program}"\n' if program else ""
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "graph"}"\n'
            f'runroot = "{self.root / "run"}"\n'
            "[storage.options.overlay]\n" + overlay
        )
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        # podman as root asks for nproc=1048576 by default, and this sandbox refuses any
        # RLIMIT_NPROC above pid_max even at the current value; never above the caller's own
        cap = _pid_max()
        nproc = tuple(min(_lim(v) if v != resource.RLIM_INFINITY else cap, cap)
                      for v in resource.getrlimit(resource.RLIMIT_NPROC))  # fmt: skip
        self.containers_conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={_lim(nofile[0])}:{_lim(nofile[1])}", '
            f'"nproc={nproc[0]}:{nproc[1]}"]\n'
            'netns = "none"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.root / "events.log"}"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{self.root / "tmp"}"\n'
            f'volume_path = "{self.root / "graph" / "volumes"}"\n'
        )
        if program:
            # containers/storage 1.43 (Debian 12's podman 4.3) gives a mount_program, on a kernel
            # with idmapped mounts, idmapped lower dirs that it detaches right after mounting,
            # and uidmapping= on top: ids shifted twice (fuse-overlayfs fails there too).  Newer
            # versions never combine them (needsIDMapping requires no mount_program); its cached
            # probe says "no idmapped lowers" here, which gives that behaviour.
            cache = self.root / "run" / "overlay"
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "idmapped-lower-dir-false").write_text("mount_program shifts ids itself")
        if self.naive_diff and self.engine == "kernel":
            # containers/storage caches its native-diff probe in the runroot; a cached "false"
            # is honoured as is (overlay.go useNaiveDiff -> cachedFeatureCheck)
            cache = self.root / "run" / "overlay"
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "native-diff()-false").write_text("naive diff chosen by the test harness")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.root / "home"),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "TMPDIR": str(self.root / "tmp"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
        }

    def run(
        self, *args: str, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """`podman ARGS`; raises PodmanError with its stderr when it fails and `check`."""
        cmd = ["podman", *args]
        proc = subprocess.run(
            cmd,
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=TIMEOUT,
            cwd=self.root,
        )
        Reaper.reap()
        if check and proc.returncode != 0:
            raise PodmanError(
                f"{' '.join(cmd)} [{self.engine}] exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return proc

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode()

    def remove(self, container: str) -> None:
        """`podman rm -f`, retried: the cleanup podman's conmon starts when a container exits
        may still hold its mounts (`userdata/shm`: EBUSY) for a moment after `run` returns."""
        for _ in range(20):
            if self.run("rm", "-f", container, check=False).returncode == 0:
                return
            time.sleep(0.25)
        self.run("rm", "-f", container)

    def load_image(self, layout: Path, ref: str, name: str) -> str:
        """Copy the OCI layout's image `ref` into this storage as `name` (no network); returns
        the image id."""
        # podman names what it pulls from an oci: layout after the layout's path, which must
        # then parse as a reference: a temp dir ending in "_" or a capital letter does not.
        # So it is pulled through a symlink whose path always parses.
        alias = Path(f"/tmp/layer-oci-{os.getpid()}-{next(_ALIASES)}")
        alias.unlink(missing_ok=True)
        alias.symlink_to(layout.resolve())
        try:
            image_id = self.out("pull", "-q", f"oci:{alias}:{ref}").strip().splitlines()[-1]
        finally:
            alias.unlink(missing_ok=True)
        self.run("image", "tag", image_id, name)
        return image_id

    def reset(self) -> None:
        """Remove every container, mount and image of this storage (best effort, then rm)."""
        self.run("rm", "-a", "-f", "-t", "0", check=False)
        self.run("unmount", "-a", "-f", check=False)
        self.run("system", "reset", "-f", check=False)
        Reaper.reap()
        # the overlay driver bind-mounts graph/overlay onto itself (private); reset leaves it
        below = str(self.root) + "/"
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(below):
                subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)


class PodmanError(RuntimeError):
    pass


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768


def _lim(value: int) -> int:
    return -1 if value == resource.RLIM_INFINITY else value


# ----- the image ---------------------------------------------------------------------------
def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info in entries:
            info.mtime = MTIME
            payload = data.get(info.name)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    return info


def busybox_layers(one_owner: bool = False) -> list[bytes]:
    """Two layers: busybox with its applets, a tree to change; then a whiteout, an opaque
    directory and a hard-link trio (OCI `.wh.` forms, as a registry would serve them).
    `one_owner`: without the file owned by 1000, so a rootless podman with no subordinate
    ids (one id mapped: the user's, as root) can hold it."""
    bb = Path(BUSYBOX).read_bytes()
    files = {
        "bin/busybox": bb,
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        "etc/group": b"root:x:0:\nuser:x:1000:\n",
        "etc/motd": b"base motd\n",
        "etc/gone.conf": b"to be whited out\n",
        "data/keep": b"kept\n" * 100,
        "data/edit": b"lower line\n",
        "opq/old1": b"old 1\n",
        "opq/sub/old2": b"old 2\n",
    }
    base = [_entry(d, tarfile.DIRTYPE, 0o755) for d in ("bin", "etc", "data", "opq", "opq/sub")]
    base += [_entry("tmp", tarfile.DIRTYPE, 0o1777), _entry("home", tarfile.DIRTYPE, 0o755)]
    base += [_entry(n, tarfile.REGTYPE, 0o755 if n == "bin/busybox" else 0o644, len(d))
             for n, d in files.items()]  # fmt: skip
    base += [_entry(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox") for a in APPLETS]
    if not one_owner:
        owned = _entry("data/owned", tarfile.REGTYPE, 0o640, 6)
        owned.uid, owned.gid = 1000, 1000
        base.append(owned)
        files["data/owned"] = b"owned\n"
    top_files = {"opq/new": b"new in the opaque dir\n", "links/h1": b"one inode, three names\n"}
    top = [
        _entry("etc", tarfile.DIRTYPE, 0o755),
        _entry("etc/.wh.gone.conf", tarfile.REGTYPE, 0o644),
        _entry("opq", tarfile.DIRTYPE, 0o755),
        _entry("opq/.wh..wh..opq", tarfile.REGTYPE, 0o644),
        _entry("opq/new", tarfile.REGTYPE, 0o644, len(top_files["opq/new"])),
        _entry("links", tarfile.DIRTYPE, 0o755),
        _entry("links/h1", tarfile.REGTYPE, 0o644, len(top_files["links/h1"])),
        _entry("links/h2", tarfile.LNKTYPE, 0o644, link="links/h1"),
        _entry("links/h3", tarfile.LNKTYPE, 0o644, link="links/h1"),
    ]
    return [_tar(base, files), _tar(top, top_files)]


def write_busybox_layout(root: Path, ref: str = "base", one_owner: bool = False) -> Path:
    """An OCI layout holding the busybox image as `ref` (deterministic; rebuilt if absent)."""
    if not (root / "index.json").exists():
        write_oci_image(
            root,
            busybox_layers(one_owner),
            ref,
            {
                "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
                # buildah checks history against the layers (one entry each)
                "history": [{"created_by": "busybox-static"}, {"created_by": "whiteouts"}],
            },
        )
    return root


# ----- listings ----------------------------------------------------------------------------
def tar_listing(data: bytes, skip: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """A tar as sorted (path, type, mode, uid:gid, size, sha256-or-target, link group) rows.
    A hard link's rows carry their file's attributes and the group of all its names, so two
    tars of one tree agree whichever name each wrote first."""
    rows: dict[str, list[str]] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            path = _clean(m.name)
            if path.startswith(skip):
                continue
            if m.islnk():
                links[path] = _clean(m.linkname)
                continue
            if m.isreg():
                f = tf.extractfile(m)
                kind, what = "file", hashlib.sha256(f.read() if f else b"").hexdigest()[:16]
            elif m.issym():
                kind, what = "symlink", m.linkname
            elif m.isdir():
                kind, what = "dir", ""
            elif m.ischr() or m.isblk():
                kind, what = "chr" if m.ischr() else "blk", f"{m.devmajor}:{m.devminor}"
            else:
                kind, what = "fifo" if m.isfifo() else repr(m.type), ""
            size = str(m.size) if m.isreg() else "-"  # a directory's tar size means nothing
            rows[path] = [path, kind, f"{m.mode:o}", f"{m.uid}:{m.gid}", size, what, ""]
    groups: dict[str, list[str]] = {}
    for name, target in links.items():
        groups.setdefault(target, [target]).append(name)
    for target, names in groups.items():
        group = ",".join(sorted(names))
        base = rows.get(target, [target, "missing", "", "", "", "", ""])
        for name in names:
            rows[name] = [name, *base[1:6], group]
    return sorted(tuple(r) for r in rows.values())


def _clean(name: str) -> str:
    name = name[2:] if name.startswith("./") else name
    return name.strip("/") or "."

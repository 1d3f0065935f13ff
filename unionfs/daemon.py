"""`layerfs`: the daemon's entry point — parse, mount, serve, unmount.

Two transports over the one handler layer (operations.UnionOperations): our own FUSE session
(`unionfs/fuse/`, the default: see `fuse/run.py` for its start-up order and shutdown) and
pyfuse3 (`-o fuse=pyfuse3` or LAYERFS_FUSE=pyfuse3), described below.

Without -f it daemonizes: the parent waits on a pipe and exits 0 only once the kernel has
sent FUSE_INIT and the mount answers (the `init` hook writes "OK"); it exits != 0 with the
daemon's own message when mounting fails.  Until then the daemon's errors go to the
caller's stderr; just before "OK" its stdout and stderr are pointed at /dev/null (a caller
that reads them, as podman does, waits for that pipe to end), and logging is set up after.
Shutdown is one path: SIGTERM/SIGINT first sync
the mount (a writable one: with the writeback cache, data of completed write(2)s may still
be dirty in the kernel's page cache, and libfuse's unmount closes /dev/fuse before the
kernel could write it back), then call `pyfuse3.terminate()`, in-flight requests finish, the
main task unmounts with `pyfuse3.close(unmount=True)`; `fusermount3 -u` ends the session loop
and takes the same path (there the kernel writes dirty pages back before it lets go).
SIGUSR1 dumps every thread's stack (faulthandler).  pyfuse3 keeps one global session per
process, so one process serves exactly one mount.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from . import logs
from .errors import OptionError
from .fdlimit import raise_nofile
from .logs import log
from .options import USAGE, MountConfig, parse_args, remount_request
from .serving import hold_signals, open_stack, readonly_options, tune_gc

EXIT_OK = 0
EXIT_MOUNT_FAILED = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        return _say(USAGE)
    if any(a in ("-V", "--version") for a in args):
        # the one version is pyproject.toml's, as installed (`layer --version` reads it too)
        import importlib.metadata  # ~30 ms: only for --version, not at every mount

        return _say(f"layerfs {importlib.metadata.version('layer')}")
    try:
        request = remount_request(args)
        if request is not None:
            return _remount(*request)
        cfg = parse_args(args)
    except OptionError as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise_nofile()  # one user's open files must not exhaust the daemon (issue 12, item 10)
    if cfg.foreground:
        _setup_logging(cfg.debug)
        logs.real()  # now: a foreground daemon imports logging at once
        return serve(cfg, ready_fd=None)
    return _daemonize(cfg)


def _remount(mountpoint: str, options: list[str]) -> int:
    """`mount -o remount,ro|rw MNT` (mount(8) runs the helper with `-o remount,...`): the
    live mount's flags change; no daemon starts."""
    from .fuse.mount import remount

    try:
        remount(mountpoint, options)
    except OSError as exc:
        print(f"layerfs: remount {mountpoint}: {exc.strerror}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    return EXIT_OK


def _say(text: str) -> int:
    """Print `text` (help, version); a reader that went away (`| head -1`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
    return EXIT_OK


def _daemonize(cfg: MountConfig) -> int:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        chunks = []
        while chunk := os.read(rfd, 4096):
            chunks.append(chunk)
        os.close(rfd)
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("OK"):
            # Skip the interpreter's teardown (~10 ms of every mount's wall time): nothing
            # is buffered and nothing else runs in this process.
            sys.stdout.flush()
            os._exit(EXIT_OK)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # SIGCHLD ignored (inherited through exec): reaped already
            pass
        print(
            msg.strip() or "layerfs: the daemon exited before the mount was live", file=sys.stderr
        )
        return EXIT_MOUNT_FAILED
    os.close(rfd)
    os.setsid()
    os.chdir("/")  # a daemon's cwd would pin the caller's filesystem (every path is absolute)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    _setup_logging(cfg.debug)  # until ready, errors reach the user's terminal
    try:
        code = serve(cfg, ready_fd=wfd)
    except BaseException as exc:  # noqa: BLE001 - the parent must hear about any failure
        _report(wfd, f"layerfs: {exc}")
        code = EXIT_MOUNT_FAILED
    os._exit(code)


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        print(message, file=sys.stderr)
        return
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {f"fsname={cfg.source}", "subtype=layerfs", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # other users and containers use the mount, kernel checks perms
        # As root, suid and dev unless told otherwise, like kernel overlayfs and fuse-overlayfs
        # (containers need setuid binaries and device nodes); libfuse's own default is
        # nosuid,nodev.  `layer mount` passes nosuid,nodev.  (fusermount3 always forces
        # nosuid,nodev for other users, so not asking there.)
        if "nosuid" not in cfg.fuse_options:
            opts.add("suid")
        if "nodev" not in cfg.fuse_options:
            opts.add("dev")
    if cfg.readonly:
        opts.add("ro")
    opts |= {o for o in cfg.fuse_options if o not in ("rw",) or not cfg.readonly}
    if cfg.readonly:
        opts.discard("rw")
    return opts


def serve(cfg: MountConfig, ready_fd: int | None) -> int:
    """Mount, serve until unmounted or signalled, unmount.  Returns the exit code."""
    for ignored in cfg.ignored:
        log.debug("ignoring mount option %s", ignored)
    os.umask(0)  # modes arrive with the caller's umask applied; ours must not apply twice
    # the handlers' FUSE types follow the transport (fuseapi.py): set before they are imported
    os.environ["LAYERFS_FUSE"] = cfg.transport
    if cfg.transport == "native":
        from .fuse.run import serve_native

        def report(message: str) -> None:
            nonlocal ready_fd
            if message != "OK":
                _report(ready_fd, message)
            elif ready_fd is not None:
                _live(ready_fd, cfg)
            ready_fd = None

        return serve_native(cfg, fuse_options(cfg), report)
    return _serve_pyfuse3(cfg, ready_fd)


def _serve_pyfuse3(cfg: MountConfig, ready_fd: int | None) -> int:
    import pyfuse3
    import trio

    from . import fuseapi
    from .atime import AtimePolicy
    from .operations import UnionOperations

    if not fuseapi.PYFUSE3:  # imported before `serve` chose: the handlers would raise the
        raise RuntimeError("the handlers were loaded for the native transport")  # wrong type

    opened = open_stack(cfg, lambda message: _report(ready_fd, message))
    if opened is None:
        return EXIT_MOUNT_FAILED
    stack, writer = opened

    def on_init() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            _live(ready_fd, cfg)
            ready_fd = None

    ops = UnionOperations(
        stack,
        writer,
        debug=cfg.debug,
        on_init=on_init,
        writeback=cfg.writeback,
        owners=cfg.owners,
        volatile=cfg.volatile,
        prefetch=cfg.prefetch,
        atime=AtimePolicy(cfg.mountpoint, cfg.fuse_options),  # before the mount: see run.py
    )
    ops.enable_acl = cfg.acl  # pyfuse3 reads it at INIT
    tune_gc()
    hold_signals()  # from the mount on, a signal must unmount, not just kill (serving.py)
    try:
        pyfuse3.init(ops, cfg.mountpoint, readonly_options(fuse_options(cfg), writer, cfg))
    except RuntimeError as exc:
        _report(ready_fd, f"layerfs: mounting {cfg.mountpoint} failed: {exc}")
        return EXIT_MOUNT_FAILED
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        trio.run(_run, pyfuse3, trio, ops, cfg.mountpoint)
    except BaseException:
        log.exception("layerfs: main loop failed")
        pyfuse3.close(unmount=True)
        return EXIT_MOUNT_FAILED
    pyfuse3.close(unmount=True)
    log.debug("unmounted %s", cfg.mountpoint)
    return EXIT_OK


async def _run(pyfuse3, trio, ops, mountpoint) -> None:  # type: ignore[no-untyped-def]
    from .serving import listen_control, serve_mount

    listener = listen_control(ops.writer) if ops.writer is not None else None
    await serve_mount(trio, ops, mountpoint, pyfuse3.main, pyfuse3.terminate, listener)


def _setup_logging(debug: bool) -> None:
    """Log to stderr, from the first record on: `logging` is imported then (logs.py), so a
    mount that logs nothing before it is live never pays for it there."""

    def to_stderr() -> None:
        import logging

        root = logging.getLogger()
        root.handlers.clear()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("layerfs[%(process)d] %(levelname)s %(message)s"))
        root.addHandler(handler)
        _levels(debug)

    logs.configure(debug, to_stderr)


def _levels(debug: bool) -> None:
    import logging

    logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if not debug else logging.DEBUG)


LOG_NAME = "layerfs.log"  # in the work dir, when there is no syslog and no log=FILE


def log_destination(cfg: MountConfig) -> str | None:
    """Where a daemonized mount logs: `log=FILE`; else syslog (None) when /dev/log exists;
    else `layerfs.log` in the work dir, so errors can be found after the fact, as the
    kernel's are in dmesg.  A read-only mount without syslog and log= keeps nothing."""
    if cfg.log_file is not None:
        return cfg.log_file
    if os.path.exists("/dev/log") or cfg.work is None:
        return None
    return os.path.join(cfg.work, LOG_NAME)


def _live(ready_fd: int, cfg: MountConfig) -> None:
    """The mount is live: point stdout and stderr at /dev/null, tell the parent "OK", then
    set up logging (`_detach_stdio`).  In that order: a caller that reads the mount program's
    output (podman keeps its stderr, as does `subprocess.run` with `capture_output`) waits
    for the end of that pipe, and the daemon, which inherited it, would otherwise hold it
    open through logging's imports (~15 ms of every mount)."""
    sys.stdout.flush()
    sys.stderr.flush()
    _stdio_to(os.open(os.devnull, os.O_RDWR))
    _report(ready_fd, "OK")
    _detach_stdio(cfg)


def _stdio_to(fd: int) -> None:
    """Make `fd` the process's stdout and stderr (and close it)."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _detach_stdio(cfg: MountConfig) -> None:
    """Once the mount is live the parent has gone (and stdio is /dev/null, `_live`): log to
    the destination.  With a log file, stdout and stderr go there too (faulthandler's
    SIGUSR1 dumps)."""
    import logging
    import logging.handlers  # here: it costs ~6 ms of start-up, and only a daemon needs it

    logs.settled()
    _levels(cfg.debug)
    root = logging.getLogger()
    root.handlers.clear()
    target = log_destination(cfg)
    handler: logging.Handler | None = None
    if target is None and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter("layerfs[%(process)d]: %(message)s"))
        except OSError:  # a socket nobody listens on: as if there were none
            target = cfg.log_file or (os.path.join(cfg.work, LOG_NAME) if cfg.work else None)
    if target is not None:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = -1  # nowhere to write: as before, nothing is kept
        if fd >= 0:
            handler = logging.StreamHandler(os.fdopen(os.dup(fd), "a", buffering=1))
            handler.setFormatter(
                logging.Formatter("%(asctime)s layerfs[%(process)d] %(levelname)s %(message)s")
            )
            _stdio_to(fd)
    root.addHandler(handler or logging.NullHandler())
    if target is not None:
        from .serving import at_unmount

        at_unmount(_close_log_file)


def _close_log_file() -> None:
    """The mount is gone: close the log file (in the work dir, it pins the upper's filesystem);
    what the daemon might still say goes nowhere."""
    import logging

    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers.clear()
    root.addHandler(logging.NullHandler())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())

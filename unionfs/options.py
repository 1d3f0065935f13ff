"""The `layerfs` command line: fuse-overlayfs's, and the form mount(8) uses.

    layerfs [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W][,OPTS] MOUNTPOINT
    layerfs SOURCE MOUNTPOINT -o rw,lowerdir=...,dev,suid      (mount -t fuse.layerfs)

The lower layers may also end in data-only layers, `lowerdir=TOP:BOTTOM::DATA1::DATA2`, or
be given one per option, `lowerdir+=TOP,lowerdir+=BOTTOM,datadir+=DATA1` (the kernel's
forms and rules: `_layers`, `split_lowerdir`).

Parsing and validation only: pure, no side effects, so it is unit-tested without a mount.
Escapes follow overlayfs: `\\:` is a colon inside a lowerdir path, `\\,` a comma inside any
option value, `\\\\` a backslash.

Options of layerfs itself (besides lowerdir/upperdir/workdir):
  writeback=0|1   the kernel's writeback cache (FUSE_WRITEBACK_CACHE): write(2) fills the page
                  cache and the kernel sends large WRITE requests later, instead of one request
                  per write(2).  Same name and values as fuse-overlayfs.  Default: 1 (0, and
                  refused, with fuse=pyfuse3: see WRITEBACK_DEFAULT).
  passthrough=0|1 FUSE passthrough (native transport, as root, kernel 6.9+): the kernel reads
                  big lower files itself; where granted it replaces the writeback cache (the
                  kernel allows only one of them).  Default: 1, unless writeback=1 is given.
  fuse=native|pyfuse3
                  the FUSE transport: our own session over /dev/fuse (unionfs/fuse/) or
                  pyfuse3 (libfuse).  Default: $LAYERFS_FUSE, else TRANSPORT_DEFAULT.
  spin=MICROSECONDS
                  native transport: after each answer, poll the device this long before
                  sleeping (fuse/session.py, `Session._spin`).  Default: $LAYERFS_SPIN_US,
                  else SPIN_DEFAULT_US; 0 sleeps at once.
  prefetch=0|1    a helper process lists the subdirectories of each directory the kernel
                  lists, ahead of a tree walk (prefetch.py).  Default: 1.
  uidmapping=STORED:SHOWN:LEN[:...], gidmapping=...
                  fuse-overlayfs's ownership shifting (podman's --uidmap): ids stored in the
                  layers are shown shifted, and shifted back when written (idmap.py).
  log=FILE        where a daemonized layerfs logs once the mount is live; default: syslog
                  when /dev/log exists, else `layerfs.log` in the work dir (daemon.py).
Options of kernel overlayfs, with the kernel's meaning:
  index=off|on    kernel overlayfs's inode index, as far as hard links go.  off (the kernel's
                  default, and what podman and Docker get): copying up one name of a hard-linked
                  lower file breaks the link, that name becomes a file of its own.  on: the names
                  stay one inode, with the kernel's link count.  Default: off.
  redirect_dir=on|follow|off|nofollow   on (default): a directory with lower parts can be
                  renamed (it gets `overlay.redirect`); follow and off: existing redirects are
                  followed, renaming such a directory gives EXDEV; nofollow: neither, and a
                  redirected directory cannot be looked up (EPERM).
  metacopy=off|on off (default): a file the kernel copied up by its metadata only (its
                  `overlay.metacopy`: the data is still below) is refused (EPERM), as the
                  kernel refuses it.  on: it is read, in any layer, its data from the file
                  below (where its `overlay.redirect` points, or the same name below), and a
                  change of data copies the data up first; a change of metadata only (chmod,
                  chown, utimes, xattrs, rename, link) copies a lower file up without its
                  data, as the kernel does.  Needs redirect_dir=on.
  uuid=off|null|auto|on   the upper's persistent uuid (`overlay.uuid` on its root), as
                  the kernel (6.6+) writes it: auto (default) on a new upper, on always when
                  absent, off and null never.  FUSE does not report it (the kernel's f_fsid).
  volatile        as the kernel (overlayfs.rst, "Volatile mount"): fsync and fsyncdir on
                  the mount skip syncing the upper, and so do copy-ups; the mount creates the
                  work dir's `work/incompat/volatile`, and a mount whose work dir has it is
                  refused (the upper may have lost writes in a crash); podman removes it
                  before each mount.
Empty options (`workdir=W,,volatile`, as podman writes them) are skipped.
Every other option is either understood, harmless here (listed below, logged under -d), or
refused with a message: a mount that silently ignores what it was asked would look right and
behave wrongly.
"""

from __future__ import annotations

import os
import stat as _stat

from .errors import OptionError

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (logs.py)
if TYPE_CHECKING:
    from .idmap import Owners


# Generic mount flags that libfuse's mount code understands; passed through to the mount.
# the access-time modes a remount may set (mount(8) passes them on)
ATIME_FLAGS = frozenset("atime diratime relatime norelatime strictatime nostrictatime".split())
FUSE_MOUNT_FLAGS = frozenset(
    "rw ro suid nosuid dev nodev exec noexec async sync noatime nodiratime dirsync".split()
)
# FUSE options passed through verbatim (with or without a value).
FUSE_PASSTHROUGH = frozenset(
    "allow_other allow_root default_permissions auto_unmount fsname subtype max_read".split()
)
# fuse-overlayfs options whose meaning we do not implement; accepting them silently would give
# a mount that looks right and behaves wrongly, so they are refused by name.
UNSUPPORTED = frozenset("squash_to_root squash_to_uid squash_to_gid static_nlink".split())

# Flags that change nothing for a FUSE daemon: mount(8)'s own (fstab, atime policy, which
# the kernel applies) and fuse-overlayfs's threading switch.  (`noacl`, fuse-overlayfs's
# "no POSIX ACLs", is honoured: MountConfig.acl.)
HARMLESS_FLAGS = frozenset(
    "defaults auto noauto nofail user nouser users _netdev relatime norelatime strictatime "
    "nostrictatime lazytime nolazytime silent loud threaded".split()
) | ({"userxattr"} if os.geteuid() != 0 else set())  # markers are user.overlay.* then anyway
# Valued options that are harmless with the values listed (None: with any value): the ones
# that name what layerfs does anyway (xino: inode numbers always carry the layer, as
# xino=on; no NFS export), and fuse-overlayfs's cache timeout.
HARMLESS_VALUES: dict[str, frozenset[str] | None] = {
    "xino": frozenset({"auto", "on"}),
    "nfs_export": frozenset({"off"}),
    "timeout": None,
    "fast_ino": frozenset({"0", "1"}),
    "threaded": frozenset({"0", "1"}),
    "fsync": frozenset({"1"}),
}
# SELinux labels (podman passes context=): meaningless where the host has no SELinux.
if not os.path.exists("/sys/fs/selinux"):
    HARMLESS_VALUES.update(dict.fromkeys(["context", "fscontext", "defcontext", "rootcontext"]))
# uuid= values, as the kernel's (markers.init_uuid)
UUID_MODES = ("off", "null", "auto", "on")
# redirect_dir values: (follow existing redirects, create new ones).  The kernel's `off`
# follows them too (its redirect_always_follow parameter is on by default).
REDIRECT_DIR = {
    "on": (True, True),
    "follow": (True, False),
    "off": (True, False),
    "nofollow": (False, False),
}

# The kernel's writeback cache is on unless `writeback=0` is given (as in fuse-overlayfs).
# Why: large WRITE requests instead of one per write(2): untar of 256 KiB files and a 1 GiB dd
# ran 1.5-2.1x faster (upper on ext4 or tmpfs); 10,000 small files about even; 1-byte appends
# to lower files ~15% slower (one more request per close: the SETATTR of the mtime).
# Why it is safe (operations.py's module docstring has the details): the daemon is the only
# writer of the upper while mounted, so the kernel's cached size and times are the truth;
# handles opened O_WRONLY read too; the kernel's SETATTRs of times are taken, also for files
# whose name is gone; a freeze (live commit, diff) syncs the mount before it closes the gate,
# and nothing reads through a frozen mount; SIGTERM syncs the mount before unmounting.
# What changes: a write(2) reaches the upper when the kernel writes it back (close, fsync,
# syncfs, memory pressure, or after ~30 s), so a kill -9 of the daemon can lose writes that
# were neither fsynced nor closed, as a crash can on any filesystem; fsync keeps its meaning.
# Not on the pyfuse3 transport: libfuse always asks for FUSE_ATOMIC_O_TRUNC, and with both the
# kernel can write data back into a file after an open(O_TRUNC) emptied it (fuse/init.py).
WRITEBACK_DEFAULT = True
# FUSE passthrough (native transport, root, kernel >= 6.9): replaces the writeback cache
# where the kernel grants it (the two exclude each other); see unionfs/fuse/passthrough.py.
PASSTHROUGH_DEFAULT = True

# Hard links on copy-up, as kernel overlayfs's `index=` (its default is off).
INDEX_DEFAULT = False

# Busy-poll after each answer, in µs (native transport).  A request that follows its
# predecessor's answer within this time is read without the daemon going to sleep and being
# woken (two context switches; on the project's 2-vCPU VM ~10-20 µs, and the interpreter's
# caches cold after it).  Measured 2026-12-05 (README, Performance): 20 µs took W5 warm, W8
# and W9 25-33 % faster and W1 11 %, for ~5-20 % more daemon CPU; pinned to the caller's CPU
# (where the caller runs first once answered) it changed nothing.
SPIN_DEFAULT_US = 20
SPIN_ENV = "LAYERFS_SPIN_US"
SPIN_MAX_US = 10_000
# A helper process lists the subdirectories of each directory the kernel lists, ahead of a
# tree walk (unionfs/prefetch.py); 0 turns it off.
PREFETCH_DEFAULT = True

TRANSPORTS = ("native", "pyfuse3")
TRANSPORT_DEFAULT = "native"
TRANSPORT_ENV = "LAYERFS_FUSE"

USAGE = (
    "usage: layerfs [-f] [-d] -o lowerdir=TOP:...:BOTTOM[,upperdir=DIR,workdir=DIR][,OPTS] "
    "MOUNTPOINT\n"
    "       layerfs SOURCE MOUNTPOINT -o lowerdir=...   (as run by mount -t fuse.layerfs)\n"
    "options: writeback=0|1  kernel writeback cache: large WRITE requests instead of one per "
    f"write(2) (default {int(WRITEBACK_DEFAULT)}; 0, and 1 refused, with fuse=pyfuse3)\n"
    "         passthrough=0|1  native FUSE as root: the kernel reads big lower files itself; "
    f"replaces the writeback cache (default {int(PASSTHROUGH_DEFAULT)})\n"
    "         fuse=native|pyfuse3  the FUSE transport (default $LAYERFS_FUSE, else "
    f"{TRANSPORT_DEFAULT})\n"
    "         spin=MICROSECONDS  native FUSE: poll for the next request this long before "
    f"sleeping (default $LAYERFS_SPIN_US, else {SPIN_DEFAULT_US}; 0: sleep at once)\n"
    "         prefetch=0|1  list subdirectories ahead of a tree walk, in a helper process "
    f"(default {int(PREFETCH_DEFAULT)})\n"
    "         index=off|on  on: hard-linked lower files stay one inode after copy-up "
    f"(default {'on' if INDEX_DEFAULT else 'off'})\n"
    "         generic mount options (ro, noatime, ...) and FUSE options (allow_other, ...)"
)


class MountConfig:
    """A validated mount request.  `lowers` is top-first, as on the command line.  Built
    with keywords by `parse_args`.  (Not a dataclass: importing `dataclasses` costs every
    mount ~7 ms.)"""

    __slots__ = (
        "lowers", "mountpoint", "fuse_options", "ignored", "owners", "upper", "work", "source",
        "foreground", "debug", "writeback", "passthrough", "transport", "index",
        "follow_redirects", "create_redirects", "volatile", "log_file", "acl", "spin_us",
        "prefetch", "metacopy", "uuid", "data_layers", "userxattr",
    )  # fmt: skip

    def __init__(
        self,
        *,
        lowers: list[str],
        mountpoint: str,
        fuse_options: set[str],
        ignored: list[str],
        owners: Owners | None,
        upper: str | None = None,
        work: str | None = None,
        source: str = "layerfs",
        foreground: bool = False,
        debug: bool = False,
        writeback: bool = WRITEBACK_DEFAULT,
        passthrough: bool = PASSTHROUGH_DEFAULT,
        transport: str = TRANSPORT_DEFAULT,
        index: bool = INDEX_DEFAULT,
        follow_redirects: bool = True,
        create_redirects: bool = True,
        volatile: bool = False,
        log_file: str | None = None,
        acl: bool = True,
        spin_us: int = SPIN_DEFAULT_US,
        prefetch: bool = PREFETCH_DEFAULT,
        metacopy: bool = False,
        uuid: str = "auto",
        data_layers: list[str] | None = None,
        userxattr: bool = False,
    ) -> None:
        self.lowers = lowers
        # data-only lower layers (`lowerdir=A::D`, `datadir+=D`): where the data of metacopy
        # files in the lowest lower layer is found by their absolute redirect (stack.py)
        self.data_layers = data_layers or []
        # `userxattr` given as root: markers in user.overlay.* only, as the kernel keeps them
        # (markers.use_user_xattrs); as another user they are there anyway
        self.userxattr = userxattr
        self.mountpoint = mountpoint
        self.fuse_options = fuse_options
        self.ignored = ignored
        self.owners = owners
        self.upper = upper
        self.work = work
        self.source = source
        self.foreground = foreground
        self.debug = debug
        self.writeback = writeback
        self.passthrough = passthrough
        self.transport = transport
        self.index = index
        self.follow_redirects = follow_redirects
        self.create_redirects = create_redirects
        self.volatile = volatile
        self.log_file = log_file
        # POSIX ACLs (FUSE_POSIX_ACL): the kernel checks access with them and caches them;
        # `noacl` (fuse-overlayfs's option) turns them off: mode bits only, as before
        self.acl = acl
        self.spin_us = spin_us  # native transport: busy-poll after each answer (SPIN_DEFAULT_US)
        self.prefetch = prefetch  # list subdirectories ahead of a tree walk (prefetch.py)
        # read files the kernel copied up by their metadata only (stack._metacopy_data)
        self.metacopy = metacopy
        self.uuid = uuid  # the upper's persistent uuid, as the kernel (markers.init_uuid)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"MountConfig({fields})"

    @property
    def readonly(self) -> bool:
        return self.upper is None


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on unescaped `sep`; keep escapes (the caller unescapes the pieces it owns)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split_lowerdir(value: str) -> tuple[list[str], list[str]]:
    """`A:B\\:c::C::D` → (['A', 'B:c'], ['C', 'D']): the lower layers, top-first, and the
    data-only layers after them (each after `::`), as the kernel's lowerdir.  A normal
    layer after a data-only one, `::` first or last, or an empty path, is refused."""
    if value == "":
        raise OptionError("lowerdir is empty")
    parts = split_escaped(value, ":")
    lowers: list[str] = []
    data: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "" and 0 < i < len(parts) - 1 and parts[i + 1] != "":
            data.append(unescape(parts[i + 1]))  # `::D`
            i += 2
            continue
        if parts[i] == "":
            raise OptionError(f"lowerdir has an empty path: {value!r}")
        if data:
            raise OptionError(
                f"lowerdir: a normal layer cannot follow a data-only layer (::): {value!r}"
            )
        lowers.append(unescape(parts[i]))
        i += 1
    return lowers, data


def parse_args(argv: list[str]) -> MountConfig:
    """Parse the command line (without argv[0]) and validate it against the filesystem."""
    source, mountpoint, values, given, foreground, debug, added = _split_args(argv)
    return _validate(values, set(given), source, mountpoint, foreground, debug, added)


def remount_request(argv: list[str]) -> tuple[str, list[str]] | None:
    """(mountpoint, the generic flags given, in their order: the last of `rw` and `ro`
    wins, as mount(8) passes fstab's options before the command line's) when the command
    line asks for a remount (`-o remount,...`: what mount(8) runs for `mount -o
    remount,ro MNT`), else None.  As kernel overlayfs on a remount through mount(2),
    every other option is ignored."""
    _, mountpoint, _, given, _, _, _ = _split_args(argv)
    if "remount" not in given:
        return None
    return mountpoint, [f for f in given if f in FUSE_MOUNT_FLAGS or f in ATIME_FLAGS]


def _split_args(
    argv: list[str],
) -> tuple[str, str, dict[str, str], list[str], bool, bool, list[tuple[str, str]]]:
    """(source, mountpoint, options with a value, options without in their order, -f, -d,
    the `lowerdir+=` and `datadir+=` options in their order: each may come many times)."""
    opts: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            raise OptionError(USAGE)
        if arg == "-f":
            foreground = True
        elif arg == "-d" or arg == "--debug":
            debug = foreground = True
        elif arg == "-o":
            try:
                opts.append(next(it))
            except StopIteration:
                raise OptionError("-o needs an argument") from None
        elif arg.startswith("-o"):
            opts.append(arg[2:])
        elif arg in ("-s", "-n", "-v"):  # single-threaded / no mtab / verbose: harmless here
            continue
        elif arg.startswith("-") and arg != "-":
            raise OptionError(f"unknown argument {arg!r}\n{USAGE}")
        else:
            positional.append(arg)
    if len(positional) == 1:
        source, mountpoint = "layerfs", positional[0]
    elif len(positional) == 2:
        source, mountpoint = positional
    else:
        raise OptionError(f"expected a mountpoint\n{USAGE}")
    values: dict[str, str] = {}
    flags: list[str] = []
    added: list[tuple[str, str]] = []
    for group in opts:
        for item in split_escaped(group, ","):
            if not item:
                continue
            key, eq, val = item.partition("=")
            if eq and key in ("lowerdir+", "datadir+"):
                added.append((key, val))
            elif eq:
                values[key] = val
            else:
                flags.append(key)
    return source, mountpoint, values, flags, foreground, debug, added


def _validate(
    values: dict[str, str],
    flags: set[str],
    source: str,
    mountpoint: str,
    foreground: bool,
    debug: bool,
    added: list[tuple[str, str]],
) -> MountConfig:
    for name in sorted(UNSUPPORTED & (set(values) | flags)):
        raise OptionError(f"option {name!r} is not supported by layerfs")
    given_lowers, given_data = _layers(values.pop("lowerdir", None), added)
    lowers = [_existing_dir(d, "lowerdir") for d in given_lowers]
    data_layers = [_existing_dir(d, "data-only lowerdir") for d in given_data]
    upper = values.pop("upperdir", None)
    work = values.pop("workdir", None)
    if (upper is None) != (work is None):
        raise OptionError("upperdir and workdir must be given together")
    if upper is not None and work is not None:
        upper = _existing_dir(unescape(upper), "upperdir")
        work = _existing_dir(unescape(work), "workdir")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise OptionError(f"workdir {work} is not on the same filesystem as upperdir {upper}")
    _refuse_overlaps(lowers + data_layers, upper, work)
    transport = _transport(values.pop("fuse", None))
    asked_writeback = values.get("writeback") == "1"
    if asked_writeback and transport == "pyfuse3":
        raise OptionError(
            "writeback=1 needs fuse=native: libfuse (pyfuse3) asks the kernel for "
            "FUSE_ATOMIC_O_TRUNC, with which written-back data can reach a file after an "
            "open(O_TRUNC) emptied it"
        )
    writeback = _switch(
        values.pop("writeback", None),
        "writeback",
        WRITEBACK_DEFAULT and transport != "pyfuse3",
        ("0", "1"),
    )
    # the kernel grants one of the two: an explicit writeback=1 turns the default off
    passthrough = _switch(
        values.pop("passthrough", None),
        "passthrough",
        PASSTHROUGH_DEFAULT and not asked_writeback,
        ("0", "1"),
    )
    if passthrough and asked_writeback:
        raise OptionError("passthrough=1 and writeback=1 exclude each other (the kernel's rule)")
    spin_us = _spin(values.pop("spin", None), transport)
    prefetch = _switch(values.pop("prefetch", None), "prefetch", PREFETCH_DEFAULT, ("0", "1"))
    index = _switch(values.pop("index", None), "index", INDEX_DEFAULT, ("off", "on"))
    asked_redirect = values.get("redirect_dir")
    redirect_dir = values.pop("redirect_dir", "on")
    if redirect_dir not in REDIRECT_DIR:
        raise OptionError(f"redirect_dir={redirect_dir}: expected one of {', '.join(REDIRECT_DIR)}")
    follow_redirects, create_redirects = REDIRECT_DIR[redirect_dir]
    metacopy = _switch(values.pop("metacopy", None), "metacopy", False, ("off", "on"))
    userxattr = "userxattr" in flags and os.geteuid() == 0
    if userxattr:
        # the kernel's rules (ovl_fs_params_verify): redirects are neither followed nor
        # made, and no metacopy: a user could forge such markers in user.* xattrs
        flags.discard("userxattr")
        if asked_redirect is not None and asked_redirect != "nofollow":
            raise OptionError(f"conflicting options: userxattr,redirect_dir={asked_redirect}")
        if metacopy:
            raise OptionError("conflicting options: userxattr,metacopy=on")
        follow_redirects, create_redirects = REDIRECT_DIR["nofollow"]
    # as the kernel: a metacopy file moved by a rename is found again by its redirect; with
    # no upper, only following them matters (its ovl_fs_params_verify)
    follows = ("on",) if upper is not None else ("on", "follow", "off")
    if metacopy and asked_redirect is not None and asked_redirect not in follows:
        raise OptionError(f"conflicting options: metacopy=on,redirect_dir={asked_redirect}")
    uuid = values.pop("uuid", "auto")
    if uuid not in UUID_MODES:
        raise OptionError(f"uuid={uuid}: expected one of {', '.join(UUID_MODES)}")
    owners = _owners(values.pop("uidmapping", None), values.pop("gidmapping", None))
    volatile = "volatile" in flags and upper is not None  # the kernel ignores it read-only
    flags.discard("volatile")
    acl = "noacl" not in flags
    flags.discard("noacl")
    _check_volatile(work)  # with or without volatile now, as the kernel
    log_file = values.pop("log", None)
    if log_file is not None:
        log_file = _log_file(unescape(log_file))
    mnt = _existing_dir(mountpoint, "mountpoint")
    fuse_options: set[str] = set()
    ignored: list[str] = []
    for flag in sorted(flags):
        if flag in FUSE_MOUNT_FLAGS or flag in FUSE_PASSTHROUGH or flag == "debug":
            fuse_options.add(flag)
            debug = debug or flag == "debug"
        elif flag in HARMLESS_FLAGS or flag.startswith("x-"):
            ignored.append(flag)
        else:
            raise OptionError(f"unknown option {flag!r}")
    for key, val in sorted(values.items()):
        if key in FUSE_PASSTHROUGH:
            fuse_options.add(f"{key}={unescape(val)}")
        else:
            ignored.append(_harmless(key, val))
    fuse_options.discard("debug")
    return MountConfig(
        lowers=lowers,
        data_layers=data_layers,
        userxattr=userxattr,
        mountpoint=mnt,
        upper=upper,
        work=work,
        source=source,
        foreground=foreground or debug,
        debug=debug,
        fuse_options=fuse_options,
        ignored=ignored,
        writeback=writeback,
        passthrough=passthrough,
        index=index,
        follow_redirects=follow_redirects,
        create_redirects=create_redirects,
        transport=transport,
        owners=owners,
        volatile=volatile,
        log_file=log_file,
        acl=acl,
        spin_us=spin_us,
        prefetch=prefetch,
        metacopy=metacopy,
        uuid=uuid,
    )


def _owners(uidmapping: str | None, gidmapping: str | None) -> Owners | None:
    """The id maps; None without uidmapping/gidmapping (idmap.py, which imports typing, is then
    not loaded before INIT: the handlers use an empty Owners)."""
    if uidmapping is None and gidmapping is None:
        return None
    from .idmap import Owners, overflow_ids, parse

    over_uid, over_gid = overflow_ids()
    return Owners(
        uids=parse(uidmapping, "uidmapping", over_uid) if uidmapping is not None else None,
        gids=parse(gidmapping, "gidmapping", over_gid) if gidmapping is not None else None,
    )


VOLATILE_MARKER = os.path.join("work", "incompat", "volatile")


def _check_volatile(work: str | None) -> None:
    """The kernel refuses a work dir that a volatile mount used (`incompat/volatile`): the
    upper may have lost writes that were never synced, so it is to be thrown away."""
    if work is not None and os.path.lexists(os.path.join(work, VOLATILE_MARKER)):
        raise OptionError(
            f"workdir {work} was used by a volatile mount ({VOLATILE_MARKER} exists): its upper "
            "may have lost writes; remove that directory to mount it anyway"
        )


def _log_file(path: str) -> str:
    """log=FILE: an absolute path (the daemon changes nothing, but say where it is), whose
    directory exists now rather than when the first error would need it."""
    full = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(full)):
        raise OptionError(f"log={path}: no such directory {os.path.dirname(full)}")
    if os.path.isdir(full):
        raise OptionError(f"log={path}: is a directory")
    return full


def _transport(value: str | None) -> str:
    """`fuse=` wins over $LAYERFS_FUSE, which wins over the default."""
    source = "fuse="
    if value is None:
        value, source = os.environ.get(TRANSPORT_ENV) or None, f"{TRANSPORT_ENV}="
    if value is None:
        return TRANSPORT_DEFAULT
    if value not in TRANSPORTS:
        raise OptionError(f"{source}{value}: expected one of {', '.join(TRANSPORTS)}")
    return value


def _spin(value: str | None, transport: str) -> int:
    """`spin=` wins over $LAYERFS_SPIN_US, which wins over the default: whole microseconds,
    0 to SPIN_MAX_US.  The option is the native transport's; the environment's default is
    left alone under pyfuse3 (libfuse's loop does not spin)."""
    source = "spin="
    if value is None:
        if transport == "pyfuse3":
            return 0
        value, source = os.environ.get(SPIN_ENV) or None, f"{SPIN_ENV}="
        if value is None:
            return SPIN_DEFAULT_US
    elif transport == "pyfuse3":
        raise OptionError("spin= needs fuse=native: libfuse's loop (pyfuse3) does not spin")
    if not value.isdigit() or int(value) > SPIN_MAX_US:
        raise OptionError(f"{source}{value}: expected whole microseconds, 0 to {SPIN_MAX_US}")
    return int(value)


def _layers(lowerdir: str | None, added: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The lower layers and the data-only layers (top-first) of `lowerdir=` or of the
    `lowerdir+=` / `datadir+=` options (one layer each, its path as given: no `:` split,
    no unescaping), with the kernel's rules: the two forms are not mixed, and a
    `lowerdir+=` does not follow a `datadir+=`, which needs a `lowerdir+=` before it."""
    if lowerdir is not None:
        if added:
            raise OptionError(f"lowerdir= and {added[0][0]}= cannot be combined")
        return split_lowerdir(lowerdir)
    if not added:
        raise OptionError("missing option lowerdir=DIR[:DIR...]")
    lowers: list[str] = []
    data: list[str] = []
    for key, path in added:
        if path == "":
            raise OptionError(f"{key}= is empty")
        if key == "datadir+":
            if not lowers:
                raise OptionError("datadir+= needs a lowerdir+= before it")
            data.append(path)
        elif data:
            raise OptionError("lowerdir+= cannot follow datadir+=")
        else:
            lowers.append(path)
    return lowers, data


def _harmless(key: str, val: str) -> str:
    """`key=val` when it changes nothing here; else the OptionError that says why."""
    if key.startswith("x-"):
        return f"{key}={val}"
    if key not in HARMLESS_VALUES:
        raise OptionError(f"unknown option {key}={val}")
    allowed = HARMLESS_VALUES[key]
    if allowed is not None and val not in allowed:
        raise OptionError(
            f"option {key}={val} is not supported by layerfs (only {', '.join(sorted(allowed))})"
        )
    return f"{key}={val}"


def _switch(value: str | None, name: str, default: bool, words: tuple[str, str]) -> bool:
    """A two-valued option spelt `words` = (off, on): fuse-overlayfs says 0|1, the kernel
    off|on."""
    if value is None:
        return default
    if value not in words:
        raise OptionError(f"{name}={value}: expected {name}={words[0]} or {name}={words[1]}")
    return value == words[1]


def _existing_dir(path: str, what: str) -> str:
    full = os.path.abspath(path)
    try:
        st = os.stat(full)
    except OSError as exc:
        raise OptionError(f"{what} {path}: {exc.strerror}") from None

    if not _stat.S_ISDIR(st.st_mode):
        raise OptionError(f"{what} {path}: not a directory")
    return full


def _ancestry(path: str, seen: dict[str, tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `path`'s real directory and of each of its parents up to /;
    `seen` keeps them by real path across calls (layers share their parents: 500 layers of
    an image, 15 → 11 ms in process)."""
    seen = {} if seen is None else seen
    out = []
    here = os.path.realpath(path)
    while True:
        found = seen.get(here)
        if found is None:
            st = os.stat(here)
            found = seen[here] = (st.st_dev, st.st_ino)
        out.append(found)
        parent = os.path.dirname(here)
        if parent == here:
            return out
        here = parent


def _refuse_overlaps(lowers: list[str], upper: str | None, work: str | None) -> None:
    """As the kernel refuses them (ELOOP, "overlapping lowerdir path"): a lower layer given
    twice, one inside another, and a lower layer that is the work dir or inside it.  Such
    a stack shows some objects twice, and copy-ups of one layer change another.  And an
    upper that is a lower layer, or inside one, or holds one (issue 12, item 17: a lower
    written through the upper).  By identity (a symlink or bind mount that leads into a
    layer counts), one walk up per layer.  First of all, an upper and a work dir that are
    not separate subtrees."""
    seen: dict[str, tuple[int, int]] = {}
    uchain = _ancestry(upper, seen) if upper is not None else []
    wchain = _ancestry(work, seen) if work is not None else []
    if uchain and wchain and (wchain[0] in uchain or uchain[0] in wchain):
        raise OptionError("upperdir and workdir must be separate subtrees")
    chains = [_ancestry(low, seen) for low in lowers]
    roots: dict[tuple[int, int], int] = {}
    for i, chain in enumerate(chains):
        first = roots.setdefault(chain[0], i)
        if first != i:
            raise OptionError(f"lowerdir {lowers[i]} is given twice (overlapping lowerdir path)")
    for i, chain in enumerate(chains):
        for above in chain[1:]:
            j = roots.get(above)
            if j is not None:
                raise OptionError(f"lowerdir {lowers[i]} is inside lowerdir {lowers[j]} "
                                  "(overlapping lowerdir path)")  # fmt: skip
    if wchain:
        for i, chain in enumerate(chains):
            if wchain[0] in chain:  # (a work dir inside a lower layer the kernel allows)
                raise OptionError(f"lowerdir {lowers[i]} is the workdir or inside it "
                                  "(overlapping lowerdir path)")  # fmt: skip
    if uchain:
        for low, chain in zip(lowers, chains, strict=True):
            if chain[0] in uchain or uchain[0] in chain:
                raise OptionError(f"upperdir {upper} overlaps lowerdir {low}")

"""The layerfs command line: fuse-overlayfs's syntax, mount(8)'s form, and clear errors."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.mounts import LAYERFS
from unionfs.errors import OptionError
from unionfs.options import (
    INDEX_DEFAULT,
    WRITEBACK_DEFAULT,
    parse_args,
    split_lowerdir,
)


def test_lowerdir_is_top_first_with_escapes():
    assert split_lowerdir("a:b:c") == (["a", "b", "c"], [])
    assert split_lowerdir(r"a\:b:c\\d") == (["a:b", "c\\d"], [])
    # `::` is no empty path but the start of a data-only layer (refused before there were any)
    assert split_lowerdir("a::b") == (["a"], ["b"])


def test_lowerdir_with_data_only_layers_after_double_colons():
    assert split_lowerdir("a:b::c::d") == (["a", "b"], ["c", "d"])
    assert split_lowerdir(r"a\:b::c\:d") == (["a:b"], ["c:d"])
    assert split_lowerdir("a") == (["a"], [])
    # as the kernel: `::` neither first nor last, no normal layer after a data-only one
    for bad in ("::c", "a::", "a::b:c", "a:::b", "a::::b", ""):
        with pytest.raises(OptionError):
            split_lowerdir(bad)


def test_lowerdir_plus_and_datadir_plus_take_one_layer_each_in_order(dirs):
    mnt = str(dirs / "mnt")
    cfg = parse_args(
        ["-o", f"lowerdir+={dirs}/we:ird,lowerdir+={dirs}/top,datadir+={dirs}/bottom", mnt]
    )
    assert cfg.lowers == [str(dirs / "we:ird"), str(dirs / "top")]
    assert cfg.data_layers == [str(dirs / "bottom")]
    cfg = parse_args(["-o", f"lowerdir={dirs}/top::{dirs}/bottom", mnt])
    assert (cfg.lowers, cfg.data_layers) == ([str(dirs / "top")], [str(dirs / "bottom")])
    for bad in (
        f"lowerdir={dirs}/top,lowerdir+={dirs}/bottom",
        f"lowerdir={dirs}/top,datadir+={dirs}/bottom",
        f"datadir+={dirs}/bottom,lowerdir+={dirs}/top",
        f"lowerdir+={dirs}/top,datadir+={dirs}/bottom,lowerdir+={dirs}/upper",
        f"lowerdir+={dirs}/we\\:ird",  # no unescaping: that name is not there
        f"lowerdir={dirs}/top::{dirs}/top",  # a layer twice, one of them data-only
    ):
        with pytest.raises(OptionError):
            parse_args(["-o", bad, mnt])


@pytest.fixture
def dirs(tmp_path):
    for name in ("top", "bottom", "upper", "work", "mnt", "we:ird"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_fuse_overlayfs_form(dirs):
    cfg = parse_args(
        [
            "-f",
            "-o",
            f"lowerdir={dirs}/top:{dirs}/bottom,upperdir={dirs}/upper,workdir={dirs}/work",
            str(dirs / "mnt"),
        ]
    )
    assert cfg.lowers == [str(dirs / "top"), str(dirs / "bottom")]
    assert cfg.upper == str(dirs / "upper") and cfg.work == str(dirs / "work")
    assert cfg.foreground and not cfg.readonly


def test_mount8_form_with_generic_options(dirs):
    # what mount.fuse3 runs for `mount -t fuse.layerfs SRC MNT -o lowerdir=...`
    cfg = parse_args(
        [
            "mysrc",
            str(dirs / "mnt"),
            "-o",
            f"rw,lowerdir={dirs}/we\\:ird:{dirs}/bottom,dev,suid,noatime,relatime,"
            "x-systemd.automount,context=foo",
        ]
    )
    assert cfg.source == "mysrc"
    assert cfg.lowers == [str(dirs / "we:ird"), str(dirs / "bottom")]
    assert cfg.readonly and not cfg.foreground
    assert {"dev", "suid", "noatime"} <= cfg.fuse_options
    assert "relatime" in cfg.ignored


def test_multiple_o_and_glued_o(dirs):
    cfg = parse_args([f"-olowerdir={dirs}/top", "-o", "ro", "-d", str(dirs / "mnt")])
    assert cfg.debug and cfg.foreground and "ro" in cfg.fuse_options


def test_writeback_option(dirs, monkeypatch):
    from unionfs.options import TRANSPORT_ENV

    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    base = f"lowerdir={dirs}/top,upperdir={dirs}/upper,workdir={dirs}/work"
    mnt = str(dirs / "mnt")
    assert parse_args(["-o", base, mnt]).writeback is WRITEBACK_DEFAULT
    assert parse_args(["-o", base + ",writeback=1", mnt]).writeback is True
    assert parse_args(["-o", base + ",writeback=0", mnt]).writeback is False
    cfg = parse_args(["-o", base, "-o", "writeback=0", mnt])
    assert not cfg.writeback and not any("writeback" in o for o in cfg.fuse_options)


def test_no_writeback_cache_on_the_pyfuse3_transport(dirs, monkeypatch):
    """libfuse always asks for FUSE_ATOMIC_O_TRUNC, which with the writeback cache lets
    written-back data reach a file after an open(O_TRUNC) emptied it: off by default there,
    and refused when asked for."""
    from unionfs.options import TRANSPORT_ENV

    base = f"lowerdir={dirs}/top,upperdir={dirs}/upper,workdir={dirs}/work"
    mnt = str(dirs / "mnt")
    monkeypatch.setenv(TRANSPORT_ENV, "pyfuse3")
    assert parse_args(["-o", base, mnt]).writeback is False
    assert parse_args(["-o", base + ",writeback=0", mnt]).writeback is False
    with pytest.raises(OptionError, match="writeback=1 needs fuse=native"):
        parse_args(["-o", base + ",writeback=1", mnt])
    assert parse_args(["-o", base + ",writeback=1,fuse=native", mnt]).writeback is True


def test_passthrough_option(dirs):
    base = f"lowerdir={dirs}/top,upperdir={dirs}/upper,workdir={dirs}/work"
    mnt = str(dirs / "mnt")
    assert parse_args(["-o", base, mnt]).passthrough is True
    assert parse_args(["-o", base + ",passthrough=0", mnt]).passthrough is False
    # the kernel grants only one of passthrough and the writeback cache
    cfg = parse_args(["-o", base + ",writeback=1", mnt])
    assert cfg.writeback and not cfg.passthrough
    with pytest.raises(OptionError, match="exclude each other"):
        parse_args(["-o", base + ",writeback=1,passthrough=1", mnt])
    with pytest.raises(OptionError, match="passthrough=2"):
        parse_args(["-o", base + ",passthrough=2", mnt])


def test_prefetch_option(dirs):
    base = f"lowerdir={dirs}/top"
    mnt = str(dirs / "mnt")
    assert parse_args(["-o", base, mnt]).prefetch is True
    cfg = parse_args(["-o", base + ",prefetch=0", mnt])
    assert cfg.prefetch is False and not any("prefetch" in o for o in cfg.fuse_options)
    with pytest.raises(OptionError, match="prefetch=yes"):
        parse_args(["-o", base + ",prefetch=yes", mnt])


def test_spin_option_and_environment(dirs, monkeypatch):
    """spin= (µs of busy-poll after each answer) wins over $LAYERFS_SPIN_US, which wins over
    the default; bad values are refused, whichever gave them; under pyfuse3 nothing spins."""
    from unionfs.options import SPIN_DEFAULT_US, SPIN_ENV, SPIN_MAX_US

    base = f"lowerdir={dirs}/top"
    mnt = str(dirs / "mnt")
    monkeypatch.delenv(SPIN_ENV, raising=False)
    monkeypatch.delenv("LAYERFS_FUSE", raising=False)
    assert parse_args(["-o", base, mnt]).spin_us == SPIN_DEFAULT_US > 0
    assert parse_args(["-o", base + ",spin=0", mnt]).spin_us == 0
    cfg = parse_args(["-o", base + f",spin={SPIN_MAX_US}", mnt])
    assert cfg.spin_us == SPIN_MAX_US and not any("spin" in o for o in cfg.fuse_options)
    monkeypatch.setenv(SPIN_ENV, "7")
    assert parse_args(["-o", base, mnt]).spin_us == 7
    assert parse_args(["-o", base + ",spin=3", mnt]).spin_us == 3  # the option wins
    for bad in ("-1", "x", "1.5", "", str(SPIN_MAX_US + 1)):
        with pytest.raises(OptionError, match="expected whole microseconds"):
            parse_args(["-o", base + f",spin={bad}", mnt])
    monkeypatch.setenv(SPIN_ENV, "lots")
    with pytest.raises(OptionError, match="LAYERFS_SPIN_US=lots"):
        parse_args(["-o", base, mnt])
    assert parse_args(["-o", base + ",fuse=pyfuse3", mnt]).spin_us == 0
    with pytest.raises(OptionError, match="spin= needs fuse=native"):
        parse_args(["-o", base + ",fuse=pyfuse3,spin=5", mnt])


def test_index_option(dirs):
    base = f"lowerdir={dirs}/top,upperdir={dirs}/upper,workdir={dirs}/work"
    mnt = str(dirs / "mnt")
    assert INDEX_DEFAULT is False  # the kernel's default, and what podman and Docker get
    assert parse_args(["-o", base, mnt]).index is False
    assert parse_args(["-o", base + ",index=on", mnt]).index is True
    cfg = parse_args(["-o", base + ",index=off", mnt])
    assert cfg.index is False and not any(
        "index" in o for o in cfg.ignored + list(cfg.fuse_options)
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        ("ro", "missing option lowerdir"),
        ("lowerdir={d}/top,writeback=yes", "writeback=0 or writeback=1"),
        ("lowerdir={d}/top,index=1", "index=off or index=on"),
        ("lowerdir={d}/top,index=nfs", "index=off or index=on"),
        ("lowerdir=/nonexistent/layer", "lowerdir /nonexistent/layer"),
        ("lowerdir={d}/top,upperdir={d}/upper", "upperdir and workdir must be given together"),
        ("lowerdir={d}/top,upperdir={d}/upper,workdir={d}/upper/w", "separate subtrees"),
        ("lowerdir={d}/top,upperdir={d}/upper,workdir=/dev/shm", "same filesystem"),
        ("lowerdir={d}/top,squash_to_root", "not supported"),
        ("lowerdir={d}/top,uidmapping=0:1000", "invalid mapping specified: uidmapping=0:1000"),
        ("lowerdir={d}/top,gidmapping=0:x:1", "invalid mapping specified: gidmapping=0:x:1"),
        ("lowerdir={d}/top,uidmapping=0:10:5:3:100:5", "ranges overlap"),
        ("lowerdir={d}/top,log=/nonexistent/dir/l.log", "no such directory"),
        ("lowerdir={d}/top/f", "not a directory"),
    ],
)
def test_bad_options(dirs, opts, message):
    (dirs / "upper" / "w").mkdir()
    (dirs / "top" / "f").write_text("x")
    if "/dev/shm" in opts and os.stat("/dev/shm").st_dev == os.stat(dirs).st_dev:
        pytest.skip("/dev/shm is on the same filesystem here")
    with pytest.raises(OptionError, match=message):
        parse_args(["-o", opts.format(d=dirs), str(dirs / "mnt")])


@pytest.mark.parametrize(
    "upper, lower",
    [
        ("{d}/into-top/up", "{d}/top"),  # the upper reached through a symlink into a lower
        ("{d}/upper", "{d}/into-upper/low"),  # a lower reached through one into the upper
        ("{d}/into-top", "{d}/top"),  # the very same directory by another name
        ("{d}/top/../top/up", "{d}/top"),  # '..' spellings
    ],
)
def test_overlap_is_checked_by_identity_not_spelling(dirs, upper, lower):
    """Issue 12, item 17: the lexical check let an upper reached through a symlink into a
    lower pass, and the lower was written."""
    (dirs / "into-top").symlink_to(dirs / "top")
    (dirs / "into-upper").symlink_to(dirs / "upper")
    (dirs / "top" / "up").mkdir()
    (dirs / "upper" / "low").mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={{d}}/work".format(d=dirs)
    with pytest.raises(OptionError, match="overlaps lowerdir"):
        parse_args(["-o", opts, str(dirs / "mnt")])


def test_workdir_through_a_symlink_into_the_upper(dirs):
    (dirs / "into-upper").symlink_to(dirs / "upper")
    opts = f"lowerdir={dirs}/top,upperdir={dirs}/upper,workdir={dirs}/into-upper"
    with pytest.raises(OptionError, match="separate subtrees"):
        parse_args(["-o", opts, str(dirs / "mnt")])


def test_bad_mountpoint(dirs):
    with pytest.raises(OptionError, match="mountpoint"):
        parse_args(["-o", f"lowerdir={dirs}/top", str(dirs / "nope")])


def test_command_line_errors_exit_2_without_traceback(dirs):
    r = subprocess.run(
        [LAYERFS, "-o", "lowerdir=/nonexistent", str(dirs / "mnt")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "layerfs: lowerdir /nonexistent" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([LAYERFS, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "lowerdir" in r.stdout


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_to_a_reader_that_went_away_is_no_error(flag):
    """`layerfs --help | head -1`: the reader may be gone before the text is written (here
    it is gone before layerfs starts); that was a BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run([LAYERFS, flag], stdout=w, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(w)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr


def test_redirect_dir_values(dirs):
    base = f"lowerdir={dirs}/top"
    on = parse_args(["-o", base, str(dirs / "mnt")])
    assert on.follow_redirects and on.create_redirects
    for value, follow in (("follow", True), ("off", True), ("nofollow", False)):
        cfg = parse_args(["-o", f"{base},redirect_dir={value}", str(dirs / "mnt")])
        assert (cfg.follow_redirects, cfg.create_redirects) == (follow, False), value
    with pytest.raises(OptionError, match="redirect_dir=sideways"):
        parse_args(["-o", f"{base},redirect_dir=sideways", str(dirs / "mnt")])


@pytest.mark.parametrize(
    "opt, message",
    [
        ("frobnicate", "unknown option 'frobnicate'"),
        ("colour=blue", "unknown option colour=blue"),
        ("metacopy=maybe", "metacopy=maybe: expected metacopy=off or metacopy=on"),
        ("metacopy=on,redirect_dir=nofollow", "conflicting options: metacopy=on"),
        ("fsync=0", "fsync=0 is not supported"),
    ],
)
def test_unknown_or_unsupported_options_fail(dirs, opt, message):
    with pytest.raises(OptionError, match=message):
        parse_args(["-o", f"lowerdir={dirs}/top,{opt}", str(dirs / "mnt")])


def test_harmless_options_are_accepted(dirs):
    opts = "xino=auto,metacopy=off,threaded=1,noauto,volatile,x-gvfs-hide"
    cfg = parse_args(["-o", f"lowerdir={dirs}/top,{opts}", str(dirs / "mnt")])
    assert {"xino=auto", "noauto"} <= set(cfg.ignored)
    assert not cfg.volatile  # as the kernel: meaningless without an upper
    assert not cfg.metacopy


def test_metacopy_option(dirs):
    base = f"lowerdir={dirs}/top"
    assert parse_args(["-o", f"{base},metacopy=on", str(dirs / "mnt")]).metacopy
    assert parse_args(["-o", f"{base},metacopy=on,redirect_dir=on", str(dirs / "mnt")]).metacopy


def test_transport_option_and_environment(dirs, monkeypatch):
    from unionfs.options import TRANSPORT_DEFAULT, TRANSPORT_ENV

    base = f"lowerdir={dirs}/top"
    mnt = str(dirs / "mnt")
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    assert parse_args(["-o", base, mnt]).transport == TRANSPORT_DEFAULT
    monkeypatch.setenv(TRANSPORT_ENV, "pyfuse3")
    assert parse_args(["-o", base, mnt]).transport == "pyfuse3"
    cfg = parse_args(["-o", base + ",fuse=native", mnt])  # the option wins over the env
    assert cfg.transport == "native" and not any("fuse=" in o for o in cfg.fuse_options)
    with pytest.raises(OptionError, match="fuse=libfuse: expected one of native, pyfuse3"):
        parse_args(["-o", base + ",fuse=libfuse", mnt])
    monkeypatch.setenv(TRANSPORT_ENV, "bogus")
    with pytest.raises(OptionError, match="LAYERFS_FUSE=bogus"):
        parse_args(["-o", base, mnt])


def test_remount_request_keeps_the_order_of_the_flags():
    """mount(8) passes fstab's options before the command line's: the last of rw/ro wins,
    and every non-generic option of a remount is ignored, as the kernel's overlayfs does."""
    from unionfs.options import remount_request

    assert remount_request(["layerfs", "/m", "-o", "rw,nosuid,remount,ro"]) == (
        "/m", ["rw", "nosuid", "ro"])  # fmt: skip
    assert remount_request(["-oro,remount", "/m", "-o", "lowerdir=/x,rw"]) == ("/m", ["ro", "rw"])
    assert remount_request(["-o", "lowerdir=/x,ro", "/m"]) is None


@pytest.mark.parametrize(
    "opts",
    [
        "lowerdir={d}/top:{d}/top",  # one layer twice
        "lowerdir={d}/top:{d}/top/in",  # one inside another
        "lowerdir={d}/top/in:{d}/top",
        "lowerdir={d}/work,upperdir={d}/upper,workdir={d}/work",  # the work dir as a layer
        "lowerdir={d}/work/in,upperdir={d}/upper,workdir={d}/work",  # a layer inside it
        "lowerdir={d}/top,upperdir={d}/upper,workdir={d}/top/w",  # a work dir in a layer: ok
        "lowerdir={d}/top:{d}/bottom,upperdir={d}/upper,workdir={d}/work",  # ok
        "ro,lowerdir={d}/top:{d}/bottom,redirect_dir=follow,metacopy=on",  # no upper: ok
        "ro,lowerdir={d}/top:{d}/bottom,redirect_dir=off,metacopy=on",
        "ro,lowerdir={d}/top:{d}/bottom,redirect_dir=nofollow,metacopy=on",
        "lowerdir={d}/top,upperdir={d}/upper,workdir={d}/work,redirect_dir=follow,metacopy=on",
    ],
)
def test_layers_and_options_the_kernel_refuses_are_refused(dirs, opts):
    """What kernel overlayfs refuses to mount (overlapping layers: ELOOP; metacopy=on with
    redirects it cannot follow), layerfs refuses, and what it mounts layerfs takes
    (xfstests overlay/060, 065).  layerfs mounted a layer given twice or inside another,
    and refused metacopy=on with redirect_dir=follow on a stack without an upper."""
    from tests.mounts import require_root

    require_root()
    for sub in ("top/in", "top/w", "work/in"):
        (dirs / sub).mkdir(parents=True)
    line = opts.format(d=dirs)
    kernel = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", line, str(dirs / "mnt")],
                            capture_output=True, timeout=30)  # fmt: skip
    if kernel.returncode == 0:
        subprocess.run(["umount", str(dirs / "mnt")], check=True, timeout=30)
    for sub in ("work/work", "work/index", "top/w/work", "top/w/index"):
        if (dirs / sub).exists():
            os.rmdir(dirs / sub)  # the kernel's, made afresh by each mount
    try:
        parse_args(["-o", line, str(dirs / "mnt")])
        ours = True
    except OptionError:
        ours = False
    assert ours == (kernel.returncode == 0), kernel.stderr

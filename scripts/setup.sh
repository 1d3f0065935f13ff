#!/bin/bash
# Set up everything layer needs on a fresh Debian machine.  Idempotent, and quick when
# already done: apt only for what is missing, pip only when pyproject.toml changed.
# One line of output per step; the logs of apt and pip are shown only when they fail.
#   setup.sh            both parts below (as root)
#   setup.sh --system   the machine, as root: Debian packages, /dev/fuse, the
#                       /usr/local/bin/{layerfs,layer} links (which every user's mounts use)
#   setup.sh --venv     the project, as any user: .venv and `pip install -e '.[test,bench]'`
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.layer-pyproject.sha256"
# fuse3: fusermount3, mount.fuse3; libfuse3-dev, pkg-config, gcc: pyfuse3 builds from its
# sdist; fuse-overlayfs: benchmarks and interop tests; attr: getfattr/setfattr; psmisc: fuser.
# docker-registry, skopeo, umoci: real registry and real clients for the image-store tests.
# podman, runc, busybox-static (+ gcc, libc6-dev for a static setuid binary): tests/test_podman.py.
# debootstrap: the benchmark's Debian image (built once, from deb.debian.org); time: peak RSS
# of the store rows; openssl: a test certificate.
PACKAGES=(fuse3 libfuse3-dev pkg-config gcc libc6-dev fuse-overlayfs attr psmisc util-linux procps
          docker-registry skopeo umoci apache2-utils fio podman runc busybox-static debootstrap openssl time)

# The interpreter the venv is built on: $LAYER_PYTHON if set, else Debian's /usr/bin/python3
# when it is 3.11 or newer, else the python3 on PATH.  Debian builds its python with PGO and
# LTO; a default pyenv or source build (no --enable-optimizations, a shared libpython) ran the
# daemon's request handlers 1.3x slower and `layer commit` 1.2x slower on the same machine.
PY=""

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

run_logged() {  # run_logged LOG CMD...: quiet unless it fails
    local log="$1"; shift
    if ! "$@" >"$log" 2>&1; then
        tail -40 "$log" >&2
        die "failed: $* (full log: $log)"
    fi
}

pick_python() {
    if [ -n "${LAYER_PYTHON:-}" ]; then
        PY="$LAYER_PYTHON"
    elif [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PY=/usr/bin/python3
    else
        PY="$(command -v python3 || true)"
    fi
}

real_executable() {  # the interpreter binary behind $1 (a venv's python: its base interpreter)
    "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))' 2>/dev/null
}

python_headers_present() {
    "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

installed() {  # `dpkg -s` alone succeeds for removed packages that left config files behind
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if [ -z "$PY" ]; then
        missing+=(python3 python3-dev python3-venv)
    else
        python_headers_present || missing+=(python3-dev)
        "$PY" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)  # for --venv later
    fi
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages: all present"
        return
    fi
    say "packages: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_logged /tmp/layer-setup-apt.log apt-get update -q
    run_logged /tmp/layer-setup-apt.log apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ -n "$PY" ] || pick_python
}

ensure_dev_fuse() {
    if [ -e /dev/fuse ]; then
        say "/dev/fuse: present"
    else
        modprobe fuse 2>/dev/null || true
        [ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
        if [ -e /dev/fuse ]; then
            say "/dev/fuse: created"
        else
            say "/dev/fuse: missing and cannot be created (mount tests will be skipped)" >&2
            return
        fi
    fi
    # Debian's fuse3 ships the udev rule KERNEL=="fuse", MODE="0666": users mount through
    # fusermount3 (rootless layerfs).  Containers and machines without udev leave the node 0600.
    if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
        chmod 0666 /dev/fuse 2>/dev/null && say "/dev/fuse: mode 0666, as fuse3's udev rule sets it"
    fi
}

create_venv() {
    [ -n "$PY" ] || die "no python3: run setup.sh --system (as root), or set LAYER_PYTHON"
    local want have
    want="$(real_executable "$PY")"
    [ -n "$want" ] || die "$PY does not run"
    if [ -x "$VENV/bin/python" ] && have="$(real_executable "$VENV/bin/python")"; then
        [ "$have" = "$want" ] && return
        # made on another interpreter (an older setup.sh, or LAYER_PYTHON changed): the
        # venv holds only what pip installs into it, so it is made again
        say "venv: rebuilding on $want (was $have)"
        rm -rf "$VENV"
    fi
    say "venv: creating $VENV on $want"
    if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's own python needs python3-venv (ensurepip) for this.
        installed python3-venv && die "$PY -m venv $VENV failed"
        [ "$(id -u)" -eq 0 ] || die "$PY -m venv needs python3-venv: run setup.sh --system"
        say "venv: apt-get install python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        run_logged /tmp/layer-setup-apt.log apt-get install -y -q python3-venv
        run_logged /tmp/layer-setup-venv.log "$PY" -m venv "$VENV"
    fi
}

install_project() {
    local want
    want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/layerfs" ] \
        && [ -x "$VENV/bin/layer" ]; then
        say "venv: up to date ($VENV)"
        return
    fi
    say "venv: pip install -e '.[test,bench]'"
    # compat mode: a plain path entry in a .pth file, where the default editable finder costs
    # ~12 ms of every start of layer and layerfs (podman starts layerfs per container)
    run_logged "$VENV/pip-install.log" "$VENV/bin/pip" install -q -e "$REPO[test,bench]" \
        --config-settings editable_mode=compat
    "$VENV/bin/python" -c 'import pyfuse3, trio, click, xxhash, isal' || die "imports fail after install"
    echo "$want" >"$STAMP"
}

compile_project() {
    # The editable install leaves the sources uncompiled, and Python writes no .pyc where
    # PYTHONDONTWRITEBYTECODE is set or the checkout is not writable (root's clone run by a
    # user): every start of layer/layerfs would compile its modules again (~45 ms). pip
    # compiles a regular install the same way. Quick when nothing changed.
    "$VENV/bin/python" -m compileall -q "$REPO/unionfs" "$REPO/imagestore" "$REPO/cli" \
        "$REPO/benchmarks" >/dev/null || die "compileall failed"
}

link_tools() {
    # mount(8) runs helpers without a useful PATH (mount.fuse3 -> sh -c 'layerfs ...'): link
    # the console scripts, whose shebang is the venv's python by absolute path.
    local tool changed=""
    for tool in layerfs layer; do
        if [ "$(readlink -f "/usr/local/bin/$tool" 2>/dev/null)" != "$(readlink -f "$VENV/bin/$tool")" ]; then
            ln -sfn "$VENV/bin/$tool" "/usr/local/bin/$tool"
            changed=1
        fi
    done
    if [ -n "$changed" ]; then
        say "links: /usr/local/bin/{layerfs,layer} -> $VENV/bin"
    else
        say "links: /usr/local/bin/{layerfs,layer} in place"
    fi
}

system=1 venv=1
case "${1:-}" in
    "") ;;
    --system) venv="" ;;
    --venv) system="" ;;
    *) die "usage: setup.sh [--system | --venv]" ;;
esac
pick_python
if [ -n "$system" ]; then
    [ "$(id -u)" -eq 0 ] || die "--system runs as root (apt-get, /dev/fuse, /usr/local/bin)"
    install_packages
    ensure_dev_fuse
fi
if [ -n "$venv" ]; then
    create_venv
    install_project
    compile_project
fi
if [ -n "$system" ]; then
    [ -x "$VENV/bin/layerfs" ] || die "no $VENV yet: run setup.sh --venv first"
    link_tools
fi

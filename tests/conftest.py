import inspect
import os

import pytest

from tests import mounts

# Test tiers, one pytest marker each (`pytest -m unit`, `-m "not mount and not slow"`):
#   unit      needs no mount, no registry, no podman (may skip parts without root);
#   mount     mounts a real filesystem (layerfs or kernel overlayfs): root or /dev/fuse;
#   registry  runs the real docker-registry (and skopeo) on 127.0.0.1;
#   podman    drives podman;
#   slow      takes more than a few seconds (alone, on the 2-vCPU machine).
# `mount` comes from the test (`@pytest.mark.mount`, `pytestmark`), or is found in the source
# of the test and of its fixtures (a call that mounts, or that requires FUSE); the others are
# listed here by module, and `unit` is what is in none of the first four.
REGISTRY_MODULES = {
    "test_commit_cli", "test_pull_registry", "test_push", "test_registry",
    "test_registry_token", "test_store_concurrency",
}  # fmt: skip
PODMAN_MODULES = {"test_podman"}
SLOW_MODULES = {
    "test_benchmarks", "test_differential", "test_oracle", "test_kernel_parity",
    "test_deep_trees", "test_many_layers", "test_bad_input", "test_store_concurrency",
    "test_fd_budget", "test_commit", "test_commit_cli", "test_mount_records", "test_rules",
    "test_podman",
}  # fmt: skip


_MOUNTS = ("require_fuse(", "LayerfsMount(", "KernelOverlay(", '"mount"', "(fuse)", " fuse,")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _mounts(item) -> bool:
    if item.get_closest_marker("mount") is not None or "fuse" in item.fixturenames:
        return True
    fns = [getattr(item, "function", None)]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        fns += [d.func for d in defs]
    return any(m in _source(fn) for fn in fns if fn is not None for m in _MOUNTS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if _mounts(item) and item.get_closest_marker("mount") is None:
            item.add_marker(pytest.mark.mount)
        if module in REGISTRY_MODULES:
            item.add_marker(pytest.mark.registry)
        if module in PODMAN_MODULES:
            item.add_marker(pytest.mark.podman)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(m) for m in ("mount", "registry", "podman")):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftover_mounts(tmp_path_factory):
    """A session-level safety net: whatever a failed test left mounted is lazily unmounted."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    left = mounts.sweep(base)
    if left:
        print(f"\nswept leftover mounts: {left}")


@pytest.fixture
def no_real_credentials(tmp_path, monkeypatch):
    """No registry test may see (or use) the machine's own registry credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "LAYER_CREDS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def store(tmp_path):
    """A fresh image store (a module may define its own `store` instead)."""
    from imagestore.store import Store

    return Store.open(tmp_path / "store")


@pytest.fixture
def fuse():
    mounts.require_fuse()


@pytest.fixture
def root():
    mounts.require_root()


def pytest_report_header(config):
    # Every layerfs a test starts inherits LAYERFS_FUSE: `LAYERFS_FUSE=pyfuse3 pytest
    # tests/test_oracle.py tests/test_differential.py` runs the oracles on the fallback.
    from unionfs.options import TRANSPORT_DEFAULT, TRANSPORT_ENV

    transport = os.environ.get(TRANSPORT_ENV) or f"{TRANSPORT_DEFAULT} (default)"
    return (
        f"CI={os.environ.get('CI', '')} euid={os.geteuid()} "
        f"/dev/fuse={'yes' if os.path.exists('/dev/fuse') else 'no'} layerfs={mounts.LAYERFS} "
        f"transport={transport}"
    )

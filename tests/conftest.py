import os

import pytest

from tests import mounts


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

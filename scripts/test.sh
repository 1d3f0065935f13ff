#!/bin/bash
# Set up (idempotent) and run the whole test suite.  Extra arguments go to pytest.
# Then, unless LAYERFS_FUSE is set (one transport chosen), the oracle and differential tests
# run again on the pyfuse3 fallback transport, so both transports stay over one handler layer.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
cd "$REPO"
"$REPO/.venv/bin/python" -m pytest -ra "$@"
if [ -z "${LAYERFS_FUSE:-}" ]; then
    LAYERFS_FUSE=pyfuse3 "$REPO/.venv/bin/python" -m pytest -ra \
        tests/test_oracle.py tests/test_differential.py tests/test_write_rules.py
fi

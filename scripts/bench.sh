#!/bin/bash
# Set up (idempotent) and run the benchmarks: layerfs vs kernel overlayfs and fuse-overlayfs.
# Extra arguments go to `python -m benchmarks run` (--quick, --rounds N, --only W1 W5 ...).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m benchmarks run "$@"

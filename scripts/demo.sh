#!/bin/bash
# Set up (idempotent) and run the main job on the built-in sample.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
exec "$REPO/.venv/bin/layer" demo "$@"

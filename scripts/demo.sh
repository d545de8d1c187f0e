#!/usr/bin/env bash
# The main job on a fresh machine: set-up (idempotent), then the example LoRA workflow run headless on a
# tiny SD1.5-format model and sample images that it makes itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
exec "$PERSONALIZE_PYTHON" scripts/demo.py "$@"

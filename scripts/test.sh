#!/usr/bin/env bash
# Run the test suite on a fresh machine: set-up (idempotent), then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bootstrap.sh
exec "$PERSONALIZE_PYTHON" -m pytest "$@"

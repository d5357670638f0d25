#!/usr/bin/env bash
# System packages the test suite starts for real: redis-server (the RAG store) and neovim (the editor
# end-to-end tests). Installs what is missing with apt when it can (root, or passwordless sudo);
# otherwise names the one command to run and fails.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nvim >/dev/null || missing+=(neovim)
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  if [ "$SUDO" != none ]; then
    echo "longbow: installing ${missing[*]} (apt)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    exit 0
  fi
fi
echo "longbow: the test suite needs ${missing[*]}; install it with: sudo apt-get install -y ${missing[*]}" >&2
exit 1

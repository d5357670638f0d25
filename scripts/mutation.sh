#!/usr/bin/env bash
# Mutation check (issue 19): break one thing at a time in the modules where a silent bug costs most and see
# whether their fast unit tests notice. Not part of CI; run it by hand after changing one of these modules
# or its tests, and update the table in docs/testing.md.
#
#   bash scripts/mutation.sh                          # every module (~1-2 h on two busy cores)
#   bash scripts/mutation.sh ringattn/merge.py        # one module (seconds to ~35 min: docs/testing.md)
#   bash scripts/mutation.sh --list services/engine/scheduler.py   # the mutants, without running them
#   bash scripts/mutation.sh --limit 20 services/engine/sampler.py  # the first 20 mutants only
#
# The runner (scripts/mutation.py, self-written: its docstring says why not mutmut) mutates a private copy
# of the repository, never the working tree, so it can run beside other work. It prints each survivor
# and writes mutation.json (--json PATH to change it). Exit status 0 even with survivors: read them.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
exec nice -n 10 "$py" scripts/mutation.py "$@"

#!/usr/bin/env bash
# The README's test command (and CI's, through .ci/run). From this clone's own files it builds, or
# reuses when its requirements are unchanged, the virtualenv .venv (see scripts/venv.sh), prints the
# versions it resolved, installs Debian's chromium for the real-browser test when it is missing, and
# runs the whole suite with the venv's Python. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

. scripts/venv.sh
energylens_venv test || exit 1
bash scripts/install_chromium.sh
echo "== environment ready in $((SECONDS - t0)) s; running the tests with $ENERGYLENS_PY"
exec "$ENERGYLENS_PY" -m pytest "$@"

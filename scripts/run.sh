#!/usr/bin/env bash
# The README's run command. From this clone's own files it builds, or reuses when its requirements are
# unchanged, the virtualenv .venv (see scripts/venv.sh), then runs `streamlit run dashboard/Home.py`
# with it; open http://localhost:8501. Extra arguments go to streamlit, e.g.
# `bash scripts/run.sh --server.port 8600`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
energylens_venv runtime || exit 1
export PATH="$(dirname "$ENERGYLENS_PY"):$PATH"
echo "== streamlit run dashboard/Home.py $*   (then open http://localhost:8501, or the URL printed below)"
exec streamlit run dashboard/Home.py "$@"

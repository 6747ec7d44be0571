#!/usr/bin/env bash
# The README's test command (and CI's, through .ci/run). From this clone's own files it builds, or
# reuses when its requirements are unchanged, the virtualenv .venv (see scripts/venv.sh), prints the
# versions it resolved, installs Debian's chromium for the real-browser test when it is missing, and
# runs the whole suite with the venv's Python. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

install_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    echo "== chromium: $(chromium --version 2>/dev/null | head -n 1 || echo 'installed')"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "== chromium is not installed and there is no apt-get: the real-browser test will be skipped"
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "== chromium is not installed and installing it needs root: the real-browser test will be skipped"
      return 0
    fi
  fi
  local log attempt
  log="$(mktemp)"
  for attempt in 1 2; do
    echo "== installing Debian's chromium (attempt $attempt of 2): apt-get update, apt-get install -y chromium"
    # apt-get waits up to 5 minutes for a lock held by another apt/dpkg instead of failing at once
    if "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >"$log" 2>&1 &&
       "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q install -y chromium \
         >>"$log" 2>&1 &&
       command -v chromium >/dev/null 2>&1; then
      echo "== chromium: $(chromium --version 2>/dev/null | head -n 1 || echo 'installed')"
      rm -f "$log"
      return 0
    fi
    echo "   apt-get failed; its last lines:"
    grep -v '^\s*$' "$log" | tail -n 15 | sed 's/^/   | /'
    [ "$attempt" = 1 ] && sleep 15
  done
  rm -f "$log"
  echo "WARNING: chromium could not be installed (apt-get's error is above): the real-browser test will be skipped"
}

. scripts/venv.sh
energylens_venv test || exit 1
install_chromium
echo "== environment ready in $((SECONDS - t0)) s; running the tests with $ENERGYLENS_PY"
exec "$ENERGYLENS_PY" -m pytest "$@"

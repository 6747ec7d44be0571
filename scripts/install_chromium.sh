#!/usr/bin/env bash
# Installs Debian's chromium for the real-browser test (tests/test_browser.py) when it is missing:
# apt-get update, then apt-get install -y chromium, waiting for a lock held by another apt/dpkg and
# trying twice. When it cannot be installed it prints apt-get's own error and exits 0: the browser
# test then skips with its reason; everything else still runs. Used by scripts/test.sh.
set -uo pipefail

version() { chromium --version 2>/dev/null | head -n 1 || echo installed; }

if command -v chromium >/dev/null 2>&1; then
  echo "== chromium: $(version)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "== chromium is not installed and there is no apt-get: the real-browser test will be skipped"
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "== chromium is not installed and installing it needs root: the real-browser test will be skipped"
    exit 0
  fi
fi
apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q)
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for attempt in 1 2; do
  echo "== installing Debian's chromium (attempt $attempt of 2): apt-get update, apt-get install -y chromium"
  if "${sudo[@]}" "${apt[@]}" update >"$log" 2>&1 &&
     "${sudo[@]}" "${apt[@]}" install -y chromium >>"$log" 2>&1 &&
     command -v chromium >/dev/null 2>&1; then
    echo "== chromium: $(version)"
    exit 0
  fi
  echo "   apt-get failed; its last lines:"
  grep -v '^\s*$' "$log" | tail -n 15 | sed 's/^/   | /'
  [ "$attempt" = 1 ] && sleep "${ENERGYLENS_APT_RETRY_WAIT:-15}"
done
echo "WARNING: chromium could not be installed (apt-get's error is above): the real-browser test will be skipped"
exit 0

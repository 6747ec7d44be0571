# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/run.sh (from the repository root): creates or reuses the
# project's virtualenv and installs EnergyLens into it from this clone's own files.
#
#   . scripts/venv.sh && energylens_venv test|runtime     # then run "$ENERGYLENS_PY"
#
# * The venv is .venv in the clone (git-ignored; ENERGYLENS_VENV=/path overrides it), made with
#   `python3 -m venv` (PYTHON=/path/to/python overrides the interpreter). It never sees the system's
#   site-packages, and PYTHONPATH is ignored, so a dependency missing from pyproject.toml fails here
#   or in the tests instead of being picked up from the machine.
# * It is reused while its stamp (.venv/.energylens-stamp) matches a SHA-256 of pyproject.toml,
#   requirements.txt, requirements-dev.txt, constraints.txt, this script, the Python version and the
#   venv's path. When any of them changes the venv is deleted and built again from scratch. The stamp
#   is written only after a complete install and a passing environment check.
# * Packages are installed with constraints.txt (the versions last seen green) when they resolve;
#   when they do not, pip's error is shown and the install is retried without it (a warning, not a
#   failure: scripts/check_env.py then lists the versions that differ).
# * scripts/check_env.py prints the versions the venv resolved and fails when a key package is
#   missing or does not import (e.g. a torchvision built for another torch).

_el_hash() {
  {
    "$1" -c 'import platform, sys; print(sys.version); print(platform.machine())'
    echo "$2"
    cat pyproject.toml requirements.txt requirements-dev.txt constraints.txt scripts/venv.sh
  } | sha256sum | cut -c1-16
}

_el_tail() {  # log lines: the end of pip's log without its progress chatter
  grep -v -e '^\s*$' -e 'WARNING: Location .* is ignored' -e ': started$' -e "finished with status 'done'" "$1" |
    tail -n "$2" | sed 's/^/   | /'
}

_el_install() {  # venv profile; pip's output goes to <venv>/install-*.log
  local venv="$1" profile="$2" req=requirements.txt
  [ "$profile" = test ] && req=requirements-dev.txt
  local t0=$SECONDS
  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  if ! "${pip[@]}" install --progress-bar off -c constraints.txt --upgrade pip >"$venv/install-pip.log" 2>&1; then
    echo "   note: pip could not be upgraded to constraints.txt's version (see $venv/install-pip.log);" \
         "using $("${pip[@]}" --version | cut -d' ' -f1-2)"
  fi
  echo "== installing EnergyLens from this clone ($req) with constraints.txt"
  if "${pip[@]}" install --progress-bar off -r "$req" -c constraints.txt >"$venv/install-constrained.log" 2>&1; then
    echo "   installed with constraints.txt in $((SECONDS - t0)) s"
    return 0
  fi
  echo "WARNING: installing with constraints.txt (the versions last seen green) failed here. pip said:"
  _el_tail "$venv/install-constrained.log" 25
  echo "== retrying without constraints.txt: versions may differ from the last green set (listed below)"
  if ! "${pip[@]}" install --progress-bar off -r "$req" >"$venv/install-unconstrained.log" 2>&1; then
    echo "error: installing $req failed. The end of $venv/install-unconstrained.log:" >&2
    _el_tail "$venv/install-unconstrained.log" 40 >&2
    return 1
  fi
  echo "   installed WITHOUT constraints.txt in $((SECONDS - t0)) s"
}

energylens_venv() {  # test | runtime
  local profile="${1:-test}"
  case "$profile" in test|runtime) ;; *) echo "energylens_venv: unknown profile '$profile'" >&2; return 2 ;; esac
  local venv="${ENERGYLENS_VENV:-$PWD/.venv}"
  local py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for c in python3 python; do
      if command -v "$c" >/dev/null 2>&1; then py="$c"; break; fi
    done
  fi
  if [ -z "$py" ] || ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: EnergyLens needs Python >= 3.10; found '${py:-no python3}'${py:+ ($("$py" -V 2>&1))}." \
         "Set PYTHON=/path/to/python3.11." >&2
    return 1
  fi
  if [ -n "${PYTHONPATH:-}${PYTHONHOME:-}" ]; then
    echo "   note: PYTHONPATH/PYTHONHOME are ignored: the project's venv sees only what it installed"
  fi
  unset PYTHONPATH PYTHONHOME
  export PYTHONNOUSERSITE=1

  local want have="" have_profile=""
  want="$(_el_hash "$py" "$venv")" || return 1
  if [ -f "$venv/.energylens-stamp" ]; then
    read -r have have_profile <"$venv/.energylens-stamp" || true
  fi
  local usable=0
  [ "$have" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null && usable=1
  if [ "$usable" = 1 ] && { [ "$profile" = runtime ] || [ "$have_profile" = test ]; }; then
    echo "== reusing $venv (requirements unchanged: $want)"
    local quick=()
    [ "$profile" = runtime ] && quick=(--quick)
    "$venv/bin/python" scripts/check_env.py --profile "$profile" "${quick[@]}" || return 1
  else
    if [ "$usable" = 1 ]; then
      echo "== adding the test tools to $venv"
    else
      if [ -e "$venv" ]; then
        if [ ! -f "$venv/pyvenv.cfg" ]; then
          echo "error: $venv exists but is not a virtualenv; move it away or set ENERGYLENS_VENV" >&2
          return 1
        fi
        echo "== $venv was made from other requirements (or not finished): building it again"
        rm -rf "$venv"
      fi
      echo "== creating $venv with $("$py" -V 2>&1) ($(command -v "$py"))"
      "$py" -m venv "$venv" || return 1
    fi
    _el_install "$venv" "$profile" || return 1
    "$venv/bin/python" scripts/check_env.py --profile "$profile" || return 1
    echo "$want $profile" >"$venv/.energylens-stamp"
  fi
  ENERGYLENS_PY="$venv/bin/python"
  export ENERGYLENS_PY
}

"""The install scripts' decisions, run against stand-ins: no apt, no pip, no network.

scripts/install_chromium.sh (apt-get update + install, a retry, apt's own error when it fails),
scripts/venv.sh's requirements hash (what makes .venv be rebuilt), scripts/check_env.py's isolation
check (a venv that sees packages from outside it is refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UTILS = ["bash", "env", "grep", "tail", "sed", "head", "mktemp", "rm", "cat", "touch", "chmod", "cut", "sha256sum"]

_APT_LOCKED_ONCE = """#!/bin/bash
echo "$*" >> "$CALLS"
n=$(cat "$CALLS" | grep -c update)
if [[ "$*" == *update* ]]; then
  if [ "$n" = 1 ]; then
    echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"; exit 100
  fi
  echo "Reading package lists..."; exit 0
fi
printf '#!/bin/bash\\necho "Chromium 156.0.0 built on Debian"\\n' > "$BIN/chromium"; chmod +x "$BIN/chromium"
echo "Setting up chromium ..."
"""

_APT_NO_PACKAGE = """#!/bin/bash
echo "$*" >> "$CALLS"
if [[ "$*" == *update* ]]; then echo "Reading package lists..."; exit 0; fi
echo "E: Unable to locate package chromium"; exit 100
"""


def _sandbox(tmp_path: Path, apt: str | None, chromium: bool = False) -> dict:
    """A PATH with only the basic utilities, `id` answering root, and stand-ins for apt-get/chromium."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for u in UTILS:
        real = shutil.which(u)
        if real is None:
            pytest.skip(f"{u} is not available")
        (bin_ / u).symlink_to(real)
    stubs = {"id": "#!/bin/bash\necho 0\n", "sleep": "#!/bin/bash\nexit 0\n"}
    if apt is not None:
        stubs["apt-get"] = apt
    if chromium:
        stubs["chromium"] = '#!/bin/bash\necho "Chromium 155.1 built on Debian"\n'
    for name, text in stubs.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    return {"PATH": str(bin_), "HOME": str(tmp_path), "BIN": str(bin_), "CALLS": str(tmp_path / "calls")}


def _install_chromium(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(REPO / "scripts" / "install_chromium.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def _calls(env: dict) -> list[str]:
    p = Path(env["CALLS"])
    return p.read_text().splitlines() if p.exists() else []


def test_chromium_present_is_left_alone(tmp_path):
    env = _sandbox(tmp_path, _APT_NO_PACKAGE, chromium=True)
    r = _install_chromium(env)
    assert r.returncode == 0 and "== chromium: Chromium 155.1" in r.stdout
    assert _calls(env) == []  # apt-get never ran


def test_chromium_install_updates_first_and_retries_after_a_lock(tmp_path):
    env = _sandbox(tmp_path, _APT_LOCKED_ONCE)
    r = _install_chromium(env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "attempt 1 of 2" in out and "attempt 2 of 2" in out
    assert "Could not get lock /var/lib/apt/lists/lock" in out  # apt's own words, not a guess
    assert out.rstrip().endswith("== chromium: Chromium 156.0.0 built on Debian")
    assert "WARNING" not in out
    calls = _calls(env)
    assert [c.split()[-1] if "update" in c else " ".join(c.split()[-3:]) for c in calls] == \
        ["update", "update", "install -y chromium"]
    assert all("DPkg::Lock::Timeout=300" in c for c in calls)


def test_chromium_that_cannot_be_installed_says_why_and_does_not_fail(tmp_path):
    env = _sandbox(tmp_path, _APT_NO_PACKAGE)
    r = _install_chromium(env)
    assert r.returncode == 0
    assert r.stdout.count("E: Unable to locate package chromium") == 2
    assert "WARNING: chromium could not be installed" in r.stdout and "will be skipped" in r.stdout
    assert len(_calls(env)) == 4  # update + install, twice


def test_no_apt_get_means_the_browser_test_skips(tmp_path):
    env = _sandbox(tmp_path, None)
    r = _install_chromium(env)
    assert r.returncode == 0 and "there is no apt-get" in r.stdout


def _hash(folder: Path) -> str:
    r = subprocess.run(["bash", "-c", f". scripts/venv.sh && _el_hash {sys.executable} {folder / '.venv'}"],
                       cwd=folder, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_venv_is_rebuilt_exactly_when_its_inputs_change(tmp_path):
    files = ["pyproject.toml", "requirements.txt", "requirements-dev.txt", "constraints.txt", "scripts/venv.sh"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, tmp_path / f)
    first = _hash(tmp_path)
    assert len(first) == 16 and _hash(tmp_path) == first
    (tmp_path / "README.md").write_text("docs do not matter")
    assert _hash(tmp_path) == first
    for f in files:
        original = (tmp_path / f).read_text()
        (tmp_path / f).write_text(original + "\n# changed\n")
        assert _hash(tmp_path) != first, f
        (tmp_path / f).write_text(original)
    assert _hash(tmp_path) == first


def test_check_env_refuses_a_venv_that_sees_outside_packages(tmp_path):
    foreign = tmp_path / "lib" / "python3" / "site-packages"
    foreign.mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "scripts" / "check_env.py"), "--quick", "--profile", "runtime"]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, env={**clean, "PYTHONPATH": str(foreign)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"the venv sees packages from outside it: {foreign}" in r.stderr
    assert "== resolved versions" in r.stdout and "torch " in r.stdout  # the versions are printed regardless
    r = subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=120)
    assert "sees packages from outside" not in r.stderr

"""Bad situations for background jobs (issue 14): the registry deleted or moved away while a job runs,
temp files of interrupted writes, a full disk, a job folder that is a symbolic link, job names with
terminal escape sequences. Real job processes run the tiny runners of jobs_fixtures.py.
docs/RELIABILITY.md lists each case with what the user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from apptest_helpers import open_page
from conftest import wait_until

from core import jobs
from core.errors import JobError
from core.jobs import files, process, store

FIXTURES = Path(__file__).resolve().parent / "jobs_fixtures.py"
KINDS = ("quick", "sleepy", "torn_write", "disk_full_outcome", "disk_full_crash", "fill_disk")
TEST_KINDS = {k: f"{FIXTURES}:{k}" for k in KINDS}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs(runs_dir, monkeypatch):
    """The shared private runs folder (conftest.runs_dir) with the test runners registered."""
    root = runs_dir
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
    monkeypatch.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield root
    _kill_leftovers(root)


def _kill_leftovers(root: Path) -> None:
    for folder in root.glob("*/job-state.json"):
        try:
            st = json.loads(folder.read_text())
        except (OSError, ValueError):
            continue
        if st.get("status") == "running" and process.process_matches(st.get("pid"), st.get("proc_start")):
            try:
                os.killpg(st["pid"], signal.SIGKILL)
            except OSError:
                pass
    process.reap_children()


# Generous: a timeout only bounds a hang (the condition either comes or never does), never a time the job must beat.
WAIT_S = 120.0


def wait_for(pred, timeout=WAIT_S, what="condition"):
    return wait_until(pred, timeout=timeout, what=what)


def wait_status(job_id, root, statuses, timeout=WAIT_S):
    statuses = (statuses,) if isinstance(statuses, str) else statuses
    return wait_for(lambda: (j := jobs.get_job(job_id, root)).status in statuses and j, timeout,
                    what=f"job {job_id} to become {'/'.join(statuses)}")


def gone(pid: int) -> bool:
    process.reap_children()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _cli(runs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENERGYLENS_EXTRA_KINDS": json.dumps(TEST_KINDS)}
    return subprocess.run([sys.executable, "-m", "core.jobs", "--runs-dir", str(runs), *args], capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=WAIT_S)


# =============================================================================================
# F3: the registry deleted or moved away while a job runs
# =============================================================================================
@pytest.mark.parametrize("how", ["deleted", "moved-away"])
def test_registry_lost_while_a_job_runs_is_rebuilt_and_the_cap_holds(runs, how):
    # runs until the test stops it: everything below sees it running, however long the checks take
    a = jobs.submit("sleepy", {"steps": 10**7, "dt": 0.05}, name="long run", device="cpu", runs_dir=runs)
    running = wait_for(lambda: (j := jobs.get_job(a.id, runs)).progress > 0 and j, what="progress")
    done_before = jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)  # queued behind it
    db_files = sorted(runs.glob("registry.sqlite*"))
    assert db_files
    for f in db_files:
        if how == "deleted":
            f.unlink()
        else:  # what the corrupt-registry message advises
            f.rename(runs.parent / f"{f.name}.moved")

    listed = {j.id: j for j in jobs.list_jobs(runs)}
    assert set(listed) == {a.id, done_before.id}, "nothing is invisible"
    assert listed[a.id].status == "running" and listed[a.id].pid == running.pid, "the live job is found by its pid"
    assert listed[a.id].name == "long run" and listed[a.id].kind == "sleepy"
    assert listed[done_before.id].status == "stopped", "a rebuild never starts anything: resume it"
    notice = jobs.registry_notice(runs)
    assert notice and "was missing and was rebuilt" in notice and "1 still running" in notice

    b = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    jobs.refresh(runs)  # the scheduler looks again: it must not start b beside the running job
    assert jobs.get_job(b.id, runs).status == "queued", "one job per device: the running one still holds the slot"
    cli = _cli(runs, "list")
    assert cli.returncode == 0 and a.id in cli.stdout and "running" in cli.stdout
    assert "warning: The job registry" in cli.stderr and "rebuilt" in cli.stderr

    stopped = jobs.stop_job(a.id, runs, grace=5.0)  # still stoppable
    assert stopped.status == "stopped" and gone(running.pid)
    assert wait_status(b.id, runs, "done").result["answer"] == 42, "the slot passes to the queued job"


def test_registry_rebuild_keeps_finished_results_and_failures(runs):
    ok = jobs.submit("quick", {"value": 7}, device="cpu", runs_dir=runs)
    wait_status(ok.id, runs, "done")
    bad = jobs.submit("disk_full_crash", {}, device="cpu", runs_dir=runs)
    failed = wait_status(bad.id, runs, "failed")
    for f in runs.glob("registry.sqlite*"):
        f.unlink()
    got = {j.id: j for j in jobs.list_jobs(runs)}
    assert got[ok.id].status == "done" and got[ok.id].result == {"answer": 42, "value": 7, "steps": 3}
    assert got[bad.id].status == "failed" and got[bad.id].error == failed.error


def test_training_page_warns_that_the_registry_was_rebuilt(runs):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)
    for f in runs.glob("registry.sqlite*"):
        f.unlink()
    at = AppTest.from_file(str(REPO / "dashboard" / "Home.py"), default_timeout=60).run()
    open_page(at, "training")
    assert not at.exception, [e.message for e in at.exception]
    warnings = " | ".join(w.value for w in at.warning)
    assert "was missing and was rebuilt" in warnings, warnings


# =============================================================================================
# F10: temp files of atomic writes interrupted by SIGKILL are removed when the job runs again
# =============================================================================================
def test_stale_temp_files_of_this_run_are_removed_on_resume(runs):
    info = jobs.submit("torn_write", {}, device="cpu", runs_dir=runs)
    wait_status(info.id, runs, "failed")
    run = Path(info.run_dir)
    stale = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    assert len(stale) == 2 and stale[0].startswith(".state.pt.") and stale[1].startswith("probe/.epoch_0001.npz.")
    keep = [run / "notes.tmp", run / ".settings.tmp", run / "probe" / ".x.abc.tmp"]  # not atomic-write temp files
    for k in keep:
        k.write_text("mine")
    jobs.resume_job(info.id, runs)
    done = wait_status(info.id, runs, "done")
    marker = json.loads((run / "marker.json").read_text())
    assert [p for p in marker["temp_files_seen"] if p not in {str(k.relative_to(run)) for k in keep}] == [], \
        "the runner never sees the stale temp files"
    assert not [p for p in stale if (run / p).exists()], "the stale temp files are gone"
    assert all(k.read_text() == "mine" for k in keep), "other files are left alone"
    assert "removed 2 stale temp file(s)" in jobs.read_log_tail(done.id, 200, runs)


def test_training_resume_removes_stale_temp_files(tmp_path):
    from core.train import TrainConfig, train

    out = tmp_path / "run"
    cfg = dict(dataset="digits", epochs=1, batch_size=32, train_limit=64, eval_samples=32, eval_steps=1,
               attack_steps=1, probe_size=8, out_dir=str(out))
    train(TrainConfig(**cfg))
    stale = out / ".state.pt.k2j4x_9q.tmp"
    stale.write_bytes(b"\0" * 1000)
    mine = out / "my.tmp"
    mine.write_text("kept")
    train(TrainConfig(**cfg, resume=True))
    assert not stale.exists() and mine.read_text() == "kept"


# =============================================================================================
# F11: a full disk: the real cause is kept and shown
# =============================================================================================
def test_registry_error_on_a_full_disk_names_the_full_disk(runs, monkeypatch):
    jobs.submit("quick", {}, device="cpu", runs_dir=runs, start=False)

    def io_error(conn, path):  # what SQLite reports when it cannot even create its -shm file
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "init_schema", io_error)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(JobError) as e:
        jobs.list_jobs(runs)
    assert "is full (4 KiB free)" in str(e.value) and "cannot be read or updated" in str(e.value)
    assert "check that" not in str(e.value), "not the misleading 'check that the folder is writable'"


def test_outcome_survives_a_registry_that_cannot_be_written(runs):
    info = jobs.submit("disk_full_outcome", {}, device="cpu", runs_dir=runs)
    wait_for(lambda: gone(files.read_state(Path(info.run_dir)).get("pid") or 0)
             and files.read_state(Path(info.run_dir)).get("status") == "failed", what="the job process to end")
    failed = wait_status(info.id, runs, "failed")
    assert failed.error == f"could not write {Path(info.run_dir) / 'last.safetensors'}: No space left on device"
    assert "out of memory" not in failed.error


def test_a_job_that_died_on_a_full_disk_is_not_reported_as_out_of_memory(runs):
    info = jobs.submit("disk_full_crash", {}, device="cpu", runs_dir=runs)
    failed = wait_status(info.id, runs, "failed")
    assert "because the disk was full" in failed.error and "No space left on device" in failed.error
    assert "killed (out of memory" not in failed.error


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not Path("/proc/mounts").exists():
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_real_full_disk_keeps_the_cause(tmp_path, monkeypatch):
    """A real 32 MiB file system filled by the job (needs root and permission to mount; skipped otherwise)."""
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "32m"):
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        root = disk / "runs"
        monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps(TEST_KINDS))
        monkeypatch.setenv("ENERGYLENS_MAX_JOBS_PER_DEVICE", "1")
        info = jobs.submit("fill_disk", {}, device="cpu", runs_dir=root)
        wait_for(lambda: files.read_state(Path(info.run_dir)).get("status") == "failed", what="the job to fail")
        state = files.read_state(Path(info.run_dir))
        assert "No space left on device" in state["error"]
        wait_for(lambda: gone(state["pid"]), what="the job process to end")
        try:  # while the disk is full: the registry may or may not be readable; if not, it says why
            seen = jobs.get_job(info.id, root)
            assert seen.status == "failed" and "No space left on device" in seen.error
        except JobError as e:
            assert "is full" in str(e), str(e)
        (Path(info.run_dir) / "big.bin").unlink()  # free the space
        after = jobs.get_job(info.id, root)
        assert after.status == "failed" and "No space left on device" in after.error
        assert "out of memory" not in after.error
    finally:
        process.reap_children()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# =============================================================================================
# F16: deleting a job whose folder is a symbolic link: refused before anything is deleted
# =============================================================================================
def test_delete_of_a_symlinked_job_folder_is_refused_before_anything_changes(runs, tmp_path):
    info = jobs.submit("quick", {}, device="cpu", runs_dir=runs)
    wait_status(info.id, runs, "done")
    run = Path(info.run_dir)
    outside = tmp_path / "outside"
    run.rename(outside)
    run.symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(JobError) as e:
        jobs.delete_job(info.id, runs)
    assert "is a symbolic link to" in str(e.value) and str(outside) in str(e.value)
    assert "Nothing was deleted" in str(e.value)
    assert jobs.get_job(info.id, runs).status == "done", "the registry row is still there"
    assert run.is_symlink() and sorted(p.name for p in outside.iterdir()) == before, "nothing was touched"
    r = _cli(runs, "delete", info.id)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr


# =============================================================================================
# F17: job names with terminal escape sequences and control characters
# =============================================================================================
EVIL_NAME = "\x1b[2J\x1b[H\x1b[31mred\x1b[0m\x07 bell\rover\u202egnp.exe\x1b]0;pwned\x07 end"


def test_control_characters_in_job_names_are_never_printed_raw(runs):
    info = jobs.submit("quick", {}, name=EVIL_NAME, device="cpu", runs_dir=runs)
    assert info.name == "red bell overgnp.exe end", repr(info.name)
    wait_status(info.id, runs, "done")
    # a row written by an older version (or by hand) still holds the raw name: printing cleans it
    with sqlite3.connect(runs / "registry.sqlite") as c:
        c.execute("UPDATE jobs SET name = ?, message = ? WHERE id = ?", (EVIL_NAME, "\x1b[5mblink\x1b[0m", info.id))
    r = _cli(runs, "list")
    assert r.returncode == 0
    for ch in ("\x1b", "\x07", "\r", "\u202e"):
        assert ch not in r.stdout, repr(ch)
    assert "red bell" in r.stdout and "blink" in r.stdout
    shown = json.loads(_cli(runs, "show", info.id).stdout)
    assert shown["name"] == EVIL_NAME, "JSON output keeps the exact value, escaped (\\u001b), never raw"


def test_ui_shows_job_names_as_plain_text():
    pytest.importorskip("streamlit")
    import common  # dashboard/ is on sys.path (tests/conftest.py)
    shown = common.plain(EVIL_NAME + " **bold** [link](http://x)")
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in shown), repr(shown)
    assert "\\*\\*bold\\*\\*" in shown and "\\[link\\]\\(http://x\\)" in shown.replace("\\.", ".")

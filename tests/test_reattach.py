"""Dashboard restarts: a running job keeps running when the dashboard goes away, a fresh session
(a restarted dashboard, or a second browser) re-attaches to it, and every session sees the same jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from apptest_helpers import open_page  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOME = str(REPO / "dashboard" / "Home.py")
FIXTURES = Path(__file__).with_name("jobs_fixtures.py")


def page_text(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "subheader", "info", "warning", "text"):
        parts += [getattr(e, "value", "") or "" for e in getattr(at, kind, [])]
    for sb in at.selectbox:
        parts += [str(o) for o in sb.options]
    return "\n".join(parts)


def open_training_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=90).run()
    open_page(at, "training")
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_jobs_outlive_the_dashboard_and_sessions_share_them(runs_dir, monkeypatch, wait_until):
    monkeypatch.setenv("ENERGYLENS_EXTRA_KINDS", json.dumps({"train": f"{FIXTURES}:sleepy"}))
    from core import jobs

    # runs until the test stops it: it is still running after the three page loads, however long they take
    info = jobs.submit("train", {"steps": 10**7, "dt": 0.1}, name="long-running-demo", device="cpu")
    try:
        wait_until(lambda: jobs.get_job(info.id).status == "running", what="the job to start")
        pid = jobs.get_job(info.id).pid

        first = open_training_page()            # the first dashboard session
        assert "long-running-demo" in page_text(first)
        del first                                # ... goes away (browser closed / server restarted)

        second = open_training_page()            # a restarted dashboard re-attaches from disk
        third = open_training_page()             # and another browser sees the same job
        for at in (second, third):
            assert "long-running-demo" in page_text(at)
        job = jobs.get_job(info.id)
        assert job.status == "running" and job.pid == pid, "the job kept running, untouched"
        os.kill(pid, 0)                          # the process is alive
        assert job.progress >= 0.0
    finally:
        jobs.stop_job(info.id)
    assert jobs.get_job(info.id).status == "stopped"

"""Shared UI pieces: error guard, background tasks, model picker, cached loaders."""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import streamlit as st
from persist import MODEL_REQUEST

from core.errors import Cancelled as _CoreCancelled
from core.errors import EnergyLensError
from core.errors import InputError
from core.runtime import eval_mode
from core.runtime import resolve_device as core_resolve_device

log = logging.getLogger("energylens.dashboard")


# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def guard(what: str = "this action"):
    """Show a clear message instead of a traceback; earlier results stay in session state."""
    try:
        yield
    except EnergyLensError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - the UI must never show a traceback
        log.error("unexpected error during %s\n%s", what, traceback.format_exc())
        st.error(f"Unexpected error during {what}: {type(e).__name__}: {e}. Earlier results are kept.")


def umap_warmup() -> bool:
    """Start numba's first UMAP compile in the background (once per server process; later calls return at once)
    unless ``ENERGYLENS_UMAP_WARMUP=0``. Returns whether the warm-up is on."""
    import os

    if os.environ.get("ENERGYLENS_UMAP_WARMUP", "1") == "0":
        return False
    from core.analysis import start_umap_warmup

    start_umap_warmup()
    return True


# ---------------------------------------------------------------------------------------------
class Cancelled(_CoreCancelled):
    """The user cancelled a background task (core code that asks ``should_stop`` catches it too)."""


@dataclass
class Task:
    """Work running in a background thread of the server; the page polls it."""

    label: str
    fraction: float = 0.0
    message: str = "starting..."
    result: Any = None
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.time)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def cancelled(self) -> bool:
        """True once Cancel was pressed (hand it to core functions as ``should_stop``)."""
        return self.cancel_event.is_set()

    def progress(self, fraction: float, message: str = "") -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")
        self.fraction = max(0.0, min(1.0, float(fraction)))
        if message:
            self.message = message

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


def start_task(key: str, label: str, fn: Callable[[Task], Any]) -> Task:
    """Run ``fn(task)`` in a daemon thread; its return value becomes ``task.result``."""
    old = st.session_state.get(key)
    if isinstance(old, Task) and not old.done:
        return old
    task = Task(label)

    def body():
        try:
            task.result = fn(task)
        except _CoreCancelled as e:
            detail = str(e)
            task.error = "Cancelled." if detail in ("", "cancelled") else f"Cancelled: {detail}."
        except EnergyLensError as e:
            task.error = str(e)
        except Exception as e:  # noqa: BLE001
            log.error("task %s failed\n%s", label, traceback.format_exc())
            task.error = f"{type(e).__name__}: {e}"
        finally:
            task.done = True

    task.thread = threading.Thread(target=body, name=f"energylens-{key}", daemon=True)
    st.session_state[key] = task
    with _LIVE_LOCK:
        _LIVE[:] = [(th, ev) for th, ev in _LIVE if th.is_alive()] + [(task.thread, task.cancel_event)]
    task.thread.start()
    return task


# Background tasks that may still run torch code: when the process exits (the server is stopped, a test session
# ends), they are asked to stop and given a moment to return, because a daemon thread left inside a torch operation
# while the interpreter tears torch down aborts the process ("terminate called without an active exception").
_LIVE: list[tuple[threading.Thread, threading.Event]] = []
_LIVE_LOCK = threading.Lock()
EXIT_GRACE_S = 20.0


def stop_all_tasks(timeout: float = EXIT_GRACE_S) -> None:
    """Cancel every background task still running and wait up to ``timeout`` seconds in all for them to return
    (the SGLD-statistics and UMAP warm-up threads too, which cannot be cancelled but finish on their own)."""
    with _LIVE_LOCK:
        live = [(th, ev) for th, ev in _LIVE if th.is_alive()]
    for _, ev in live:
        ev.set()
    deadline = time.monotonic() + timeout
    others = [t for t in threading.enumerate() if t.daemon and t.is_alive()
              and t.name.startswith(("energylens-sgld-warmup", "energylens-umap-warmup"))]
    for th in [th for th, _ in live] + others:
        th.join(max(0.0, deadline - time.monotonic()))


atexit.register(stop_all_tasks)


def wait_briefly(task: Task, seconds: float = 1.5) -> None:
    """Let short tasks finish within the same rerun, so quick actions feel instant."""
    if task.thread is not None:
        task.thread.join(timeout=seconds)


# Polling backs off: every 0.5 s while a task is young (a quick action answers quickly), then every 1 s, then every
# 2 s. Each poll is a fragment rerun (only the progress block) that takes the GIL from the worker thread for a moment.
POLL_STEPS: tuple[tuple[float, float], ...] = ((5.0, 0.5), (30.0, 1.0))
POLL_SLOWEST = 2.0


def poll_every(elapsed: float) -> float:
    """Seconds between progress polls of a task that has run for ``elapsed`` seconds (never shorter later on)."""
    for until, every in POLL_STEPS:
        if elapsed < until:
            return every
    return POLL_SLOWEST


def task_panel(key: str, on_done: Callable[[Task], None]) -> None:
    """Show progress of a running task (polled by a fragment, at :func:`poll_every`'s backing-off interval); call
    ``on_done`` once when finished.

    A finished task is handled in the main script run, so results render in the same rerun; only a
    completion noticed by the polling fragment triggers one full rerun. A fragment's interval is fixed when the
    page script defines it, so when the task grows into a slower polling step the fragment asks for one full rerun,
    which defines it again with the longer interval.
    """
    task = st.session_state.get(key)
    if not isinstance(task, Task):
        return
    if task.done:
        if not getattr(task, "_handled", False):
            task._handled = True  # type: ignore[attr-defined]
            if task.error:
                st.session_state[f"{key}-error"] = task.error
            else:
                st.session_state.pop(f"{key}-error", None)
                on_done(task)
        err = st.session_state.get(f"{key}-error")
        if err:
            st.error(err)
        return

    every = poll_every(task.elapsed)

    @st.fragment(run_every=every)
    def _poll():
        t = st.session_state.get(key)
        if not isinstance(t, Task):
            return
        if t.done or poll_every(t.elapsed) != every:
            st.rerun()  # full rerun: the branch above handles the result, or the fragment polls less often
        c1, c2 = st.columns([5, 1])
        c1.progress(t.fraction, text=f"{t.label}: {t.message} ({t.elapsed:.0f} s)")
        if c2.button("Cancel", key=f"{key}-cancel"):
            t.cancel_event.set()

    _poll()


# ---------------------------------------------------------------------------------------------
_MD_SPECIAL = "\\`*_{}[]<>()#+-.!|~$"


def plain(text) -> str:
    """Free text (a job name) for st.markdown: control characters and escape sequences removed, markdown
    syntax escaped, so that it shows as typed and cannot format or link anything."""
    from core.jobs import clean_text

    return "".join("\\" + c if c in _MD_SPECIAL else c for c in clean_text(text, 200))


def registry_warning() -> None:
    """The job registry was rebuilt from the job folders recently (core.jobs.registry_notice): say so."""
    from core import jobs

    try:
        notice = jobs.registry_notice()
    except EnergyLensError:
        return
    if notice:
        st.warning(notice)


def job_failure(where, info, what: str = "") -> None:
    """A failed job: its first error line, and the full error with the log tail in an expander."""
    from core import jobs

    first = (info.error or "no error message").splitlines()[0]
    where.error(f"{what + ' ' if what else ''}failed: {first}")
    with where.expander("Error and log tail"):
        st.code((info.error or "") + "\n\n" + (jobs.read_log_tail(info.id, 40) or "(empty log)"))


def job_panel(job_id: str, what: str, on_done: Callable[[Any], None], *, every: float = 2.0,
              busy: Callable[[Any], bool] | None = None) -> None:
    """One background job: progress while it runs (polled every ``every`` s), its error and log if it
    failed, its status if stopped, else ``on_done(job)``. ``busy(job)`` keeps polling after the job
    itself ended (e.g. while jobs it launched still run); one full rerun follows the end of polling."""
    from core import jobs

    def running(info) -> bool:
        return info.active or (busy is not None and busy(info))

    try:
        poll = running(jobs.get_job(job_id))
    except EnergyLensError:
        poll = False

    @st.fragment(run_every=every if poll else None)
    def _panel():
        try:
            info = jobs.get_job(job_id)
        except EnergyLensError as e:
            st.error(str(e))
            return
        if info.active:
            st.progress(info.progress, text=f"{what} {info.id} ({info.status}): {plain(info.message)}")
            return
        if poll and not running(info):
            st.rerun()  # everything ended: refresh the whole page and stop polling
        if info.status == "failed":
            job_failure(st, info, f"{what} {info.id}")
        elif info.status != "done":
            st.warning(f"{what} {info.id} is {info.status}.")
        else:
            on_done(info)

    _panel()


def job_list(kind: str, prefix: str, show_done: Callable[[Any, Any, Any], dict | None], *, heading: str | None = None,
             empty: str = "No jobs yet.", limit: int = 30, resumable: bool = False,
             widths: tuple[int, int, int] = (4, 4, 2)) -> list:
    """The background jobs of one kind (core.jobs), newest first, polled every 2 s while one is active.

    Running jobs show progress and Stop; failed ones their error and log tail (and Resume if
    ``resumable``); finished ones whatever ``show_done(job, middle_column, right_column)`` draws. The
    dicts it returns are shown as one table under the list. Returns the jobs as read by the page run.
    """
    from core import jobs

    try:
        all_jobs = jobs.list_jobs(kind=kind)
    except EnergyLensError as e:
        st.error(str(e))
        return []
    active = any(j.active for j in all_jobs)

    @st.fragment(run_every=2.0 if active else None)
    def _panel():
        try:
            js = jobs.list_jobs(kind=kind)
        except EnergyLensError as e:
            st.error(str(e))
            return
        if active and not any(j.active for j in js):
            st.rerun()  # everything finished: refresh the whole page (tables built from results) and stop polling
        if heading:
            st.subheader(heading)
        registry_warning()
        if not js:
            st.caption(empty)
            return
        rows = []
        for j in js[:limit]:
            c1, c2, c3 = st.columns(list(widths))
            c1.markdown(f"**{plain(j.name)}**  \n`{j.id}` · {j.status} · {j.device}"
                        + (f" · {j.duration:.0f} s" if j.duration is not None else ""))
            if j.active:
                c2.progress(j.progress, text=plain(j.message or j.status))
                if c3.button("Stop", key=f"{prefix}_stop_{j.id}"):
                    with guard("stopping the job"):
                        jobs.stop_job(j.id)
                        st.rerun()
                continue
            if j.status == "done" and j.result:
                row = show_done(j, c2, c3)
                if row:
                    rows.append(row)
                continue
            if j.status == "failed":
                job_failure(c2, j)
            else:
                c2.warning(j.status)
            if resumable and c3.button("Resume", key=f"{prefix}_resume_{j.id}", help="finished work is skipped"):
                with guard("resuming the job"):
                    jobs.resume_job(j.id)
                    st.rerun()
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")

    _panel()
    return all_jobs


# ---------------------------------------------------------------------------------------------
def widget_default(key: str, value: Any, scope: Any = None) -> None:
    """Give the widget ``key`` its default through session state (create the widget without ``value=``).

    A value already there is kept (the user's, or one the guided tour set), unless the default's ``scope`` (e.g.
    the model's dataset, for a dataset-dependent ε) changed since the default was last applied."""
    marker = f"_default_scope_{key}"
    if key not in st.session_state:
        st.session_state[key] = value
    elif scope is not None and marker in st.session_state and st.session_state[marker] != scope:
        st.session_state[key] = value
    st.session_state[marker] = scope


# ---------------------------------------------------------------------------------------------
def resolve_device(choice: str) -> str:
    """The device of the sidebar's choice ('auto' -> the GPU when there is one); an impossible choice falls back to
    the CPU (the sidebar only offers the devices present)."""
    try:
        return str(core_resolve_device(choice))
    except InputError:
        return "cpu"


@st.cache_resource(show_spinner="Loading model...", max_entries=4)
def _load_model_cached(ref_key: str, _ref, device: str, allow_download: bool, mtime: float):
    from core.models.registry import load_model_ref

    return load_model_ref(_ref, device=device, allow_download=allow_download)


@st.cache_resource(show_spinner="Loading dataset...", max_entries=4)
def load_dataset_cached(name: str, split: str):
    from core.data import load_dataset

    return load_dataset(name, split)


def load_ref(ref):
    """A LoadedModel for ``ref`` through the shared cache (raises EnergyLensError)."""
    device = resolve_device(st.session_state.get("device", "auto"))
    mtime = 0.0
    if ref.path:
        p = Path(ref.path)
        mtime = p.stat().st_mtime if p.exists() else -1.0
    return _load_model_cached(ref.key, ref, device, bool(st.session_state.get("allow_download", False)), mtime)


def comparable_models(meta) -> list:
    """Bundled and local checkpoints on the same dataset as ``meta`` (other than it): [(ref, meta)]."""
    from core.models.registry import list_bundled, list_local

    out = []
    for lister in (list_bundled, list_local):
        try:
            entries = lister()
        except Exception:  # noqa: BLE001 - an unreadable folder only hides its models
            continue
        out += [(r, m) for r, m, err in entries if m is not None and m.dataset == meta.dataset and r.name != meta.name]
    return out


def current_model():
    """The LoadedModel chosen in the sidebar, or None (with a message shown)."""
    ref = st.session_state.get("model_ref")
    if ref is None:
        st.info("Choose a model in the sidebar.")
        return None
    device = resolve_device(st.session_state.get("device", "auto"))
    mtime = 0.0
    if ref.path:
        p = Path(ref.path)
        mtime = p.stat().st_mtime if p.exists() else -1.0
    try:
        return _load_model_cached(ref.key, ref, device, bool(st.session_state.get("allow_download", False)), mtime)
    except EnergyLensError as e:
        st.error(f"Could not load model **{ref.name}**: {e}")
    except Exception as e:  # noqa: BLE001
        log.error("model load failed\n%s", traceback.format_exc())
        st.error(f"Could not load model **{ref.name}**: {type(e).__name__}: {e}")
    return None


def model_dataset(lm, split: str = "test", quiet: bool = False):
    """The model's dataset split, or None (with instructions unless ``quiet``) when it is not available."""
    name = lm.meta.dataset
    try:
        return load_dataset_cached(name, split)
    except EnergyLensError as e:
        if not quiet:
            st.warning(f"The {split} images of dataset '{name}' are not available: {e}  "
                       "You can still upload your own images.")
    return None


@st.cache_data(show_spinner="Computing the test images' energies...", max_entries=8)
def _test_energies_cached(ref_key: str, _lm, dataset: str, n: int):
    import torch

    from core.drift import natural_trace

    ds = load_dataset_cached(dataset, "test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return natural_trace(_lm.model, ds.images(idx), ds.labels(idx)).marginal[0]


def test_energies(lm, n: int | None = None):
    """E(x) of (up to ``n``) test images of the model's dataset -- the reference for the out-of-distribution hint --
    or None when the test split is not available. By default n is 2,000 for small models and fewer (down to 200) for
    big ones, so the reference costs a few seconds at most on a CPU."""
    ref = st.session_state.get("model_ref")
    if n is None:
        params = sum(p.numel() for p in lm.model.parameters())
        n = int(min(2000, max(200, 1e10 / max(params, 1))))
    try:
        load_dataset_cached(lm.meta.dataset, "test")
    except EnergyLensError:
        return None
    return _test_energies_cached(getattr(ref, "key", lm.meta.name), lm, lm.meta.dataset, n)


@st.cache_resource(show_spinner=False, max_entries=8)
def _forward_s_per_image(ref_key: str, _lm) -> float:
    """Seconds per image of one forward pass of the model, measured here (32 images, after one warm-up pass)."""
    import torch

    from core.models import device_of

    shape = tuple(_lm.meta.input_shape or (3, 32, 32))
    x = torch.rand((32, *shape), generator=torch.Generator().manual_seed(0)).to(device_of(_lm.model))
    # the model is shared by every session (st.cache_resource): eval mode only through core's thread-safe holder
    with eval_mode(_lm.model) as model, torch.no_grad():
        model(x[:4])
        t0 = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(x)


# a gradient step (forward + backward) costs about three forward passes
PASSES_PER_GRADIENT_STEP = 3


def time_promise(lm, n: int, passes: float) -> str:
    """'about 4 s' for ``passes`` forward-pass equivalents over ``n`` images, from a forward pass of this model timed
    on this machine (the in-app time promises come from measurements, not from a figure written on another CPU)."""
    ref = st.session_state.get("model_ref")
    per = _forward_s_per_image(getattr(ref, "key", lm.meta.name), lm)
    secs = per * max(n, 1) * max(passes, 1)
    text = f"{secs:.1f} s" if secs < 10 else f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} min"
    return f"about {text} here (estimated from a forward pass of this model timed on this machine)"


def require_split(lm, split: str, n: int):
    """The model's dataset split holding at least ``n`` images, or an InputError saying why not (the count's
    rules: core.attacks.budget.check_interactive_images)."""
    from core.attacks.budget import check_interactive_images
    from core.errors import InputError

    ds = model_dataset(lm, split)
    if ds is None:
        raise InputError(f"no {split} images are available for dataset '{lm.meta.dataset}'")
    check_interactive_images(n, len(ds), split=split, dataset=lm.meta.dataset)
    return ds


def demo_pack_problem() -> str | None:
    """Why the CIFAR-10 demo pack cannot be used here (missing or corrupt file), or None when it is fine."""
    from core.data.demo import DEMO_TEST_FILE, load_demo

    try:
        load_demo("test")
    except EnergyLensError as e:
        return f"The CIFAR-10 demo images ({DEMO_TEST_FILE}) cannot be used: {e}"
    return None


def _default_bundled(good, problem: str | None) -> int:
    """Index of the model the app opens on: the non-robust CIFAR-10 demo model, else the digits one."""
    from core.models.registry import DEFAULT_MODEL, FALLBACK_MODEL

    names = [r.name for r, _ in good]
    for want in ([] if problem else [DEFAULT_MODEL]) + [FALLBACK_MODEL]:
        if want in names:
            return names.index(want)
    return 0


def _select_model(ident: dict) -> None:
    """Set the sidebar's widgets (before they are drawn) to the model ``ident`` (a ModelRef as a dict)."""
    source = ident.get("source")
    if source in ("bundled", "local"):
        label = "Bundled" if source == "bundled" else "Local checkpoints"
        st.session_state["model_source"] = label
        st.session_state[f"pick-{label}"] = ident.get("name")
    elif source == "zoo":
        st.session_state["model_source"] = "RobustBench zoo"
        st.session_state["zoo_ds"] = ident.get("dataset")
        st.session_state["zoo_tm"] = ident.get("threat_model")
        st.session_state["zoo_name"] = ident.get("name")


def model_picker() -> None:
    """Sidebar: source, model, device. Stores a ModelRef in st.session_state['model_ref'].

    Opens on the non-robust CIFAR-10 demo model; when the demo pack is missing or corrupt it says so and opens on
    the digits model instead. The checkpoint widget's value is the model *name* (stable across reruns and settable
    by the guided tour)."""
    from core.models.registry import ModelRef, list_bundled, list_local

    request = st.session_state.pop(MODEL_REQUEST, None)   # a reload restores a result's model; a shared link
    if isinstance(request, dict):
        _select_model(request)
    sb = st.sidebar
    sb.markdown("### Model")
    source = sb.radio("Source", ["Bundled", "Local checkpoints", "RobustBench zoo"], key="model_source",
                      horizontal=False, label_visibility="collapsed")
    ref = None
    if source in ("Bundled", "Local checkpoints"):
        try:
            entries = list_bundled() if source == "Bundled" else list_local()
        except Exception as e:  # noqa: BLE001 - the picker is on every page: nothing may break it
            log.error("listing checkpoints failed\n%s", traceback.format_exc())
            sb.error(f"Could not list the checkpoints: {type(e).__name__}: {e}")
            entries = []
        good = [(r, m) for r, m, err in entries if m is not None]
        bad = [(r, err) for r, m, err in entries if m is None]
        problem = demo_pack_problem() if source == "Bundled" else None
        if problem:
            sb.warning(f"{problem} The app opened on the digits model instead.")
        if not good:
            sb.info("No checkpoints here yet." + (" Train one on the Training page." if source != "Bundled" else ""))
        else:
            by_name = {r.name: (r, m) for r, m in good}
            names = list(by_name)
            key = f"pick-{source}"
            if st.session_state.get(key) not in by_name:
                st.session_state[key] = names[_default_bundled(good, problem) if source == "Bundled" else 0]
            name = sb.selectbox("Checkpoint", names, key=key,
                                format_func=lambda n: f"{n} ({by_name[n][1].method}, {by_name[n][1].dataset})")
            ref = by_name[name][0]
        for r, err in bad:
            sb.caption(f":material/warning: skipped {Path(r.path).name} (unreadable): {err}")
    else:
        from core import zoo

        ds = sb.selectbox("Dataset", ["cifar10", "cifar100"], key="zoo_ds")
        tm = sb.selectbox("Threat model", ["Linf", "L2"], key="zoo_tm")
        try:
            entries = zoo.list_zoo(ds, tm)
        except EnergyLensError as e:
            sb.error(str(e))
            entries = []
        except Exception as e:  # noqa: BLE001 - the picker is on every page: nothing may break it
            log.error("listing the zoo failed\n%s", traceback.format_exc())
            sb.error(f"Could not list the RobustBench zoo: {type(e).__name__}: {e}")
            entries = []
        entries = sorted(entries, key=lambda e: (not e.paper_model, e.name))
        if entries:
            names = [e.name for e in entries]
            def mark(e) -> str:
                if getattr(e, "downloaded", False):
                    return " ✓"
                return " ⚠" if getattr(e, "file_status", None) not in (None, "missing", "hub") else ""

            fmt = {e.name: ("★ " if e.paper_model else "") + e.name + mark(e) for e in entries}
            name = sb.selectbox("Model (★ = in the paper, ✓ = downloaded, ⚠ = bad file)", names,
                                format_func=lambda n: fmt[n], key="zoo_name")
            ref = ModelRef("zoo", name, dataset=ds, threat_model=tm)
        sb.checkbox("Allow download (needs internet)", key="allow_download")
    import torch

    opts = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sb.selectbox("Device", opts, key="device", help="auto = CUDA when a GPU is present, else CPU")
    st.session_state["model_ref"] = ref


def require_model(title: str):
    """Page preamble: title, the sidebar's model (or stop with a hint), and a one-line caption.

    Returns ``(lm, meta, class_names, default_eps)``; ``default_eps`` is the model's threat-model
    budget (zoo) or its dataset's default (16/255 for digits, 8/255 otherwise).
    """
    from core.evaluation import default_eps

    st.title(title)
    lm = current_model()
    if lm is None:
        st.stop()
    meta = lm.meta
    classes = meta.class_names or [str(i) for i in range(meta.num_classes)]
    st.caption(f"Model **{meta.name}** — {meta.arch}, {meta.dataset}, {meta.num_classes} classes, trained with "
               f"**{meta.method}**.")
    return lm, meta, classes, default_eps(meta, "Linf")

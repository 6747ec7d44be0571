"""Loading a zoo model through ``robustbench.utils.load_model``, with every failure turned into a readable
:class:`~core.errors.ZooError` (missing file, HTML page saved as ``.pt``, pickled code, wrong architecture, no
internet)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import urllib.error
from pathlib import Path
from typing import Iterator

import torch

from ..compat import forced_weights_only, import_robustbench_utils
from ..errors import ZooError
from ..models.checkpoint import LoadedModel, ModelMeta
from ..storage import sniff_format
from .entries import CIFAR10_CLASSES, DEFAULT_ZOO_DIR, ZooEntry
from .files import _OK_FORMATS, _bad_file_message, _remember_refusal, quarantine, zoo_files
from .lookup import get_zoo_entry

_load_lock = threading.RLock()


class _DownloadBlocked(Exception):
    """Raised by the stand-in download function while downloads are disabled."""


#: robustbench's Google-Drive download functions (the name changed between releases).
DOWNLOADERS = ("download_gdrive", "download_gdrive_new")


@contextlib.contextmanager
def _downloads(rb_utils, allowed: bool) -> Iterator[None]:
    """While not ``allowed``, replace robustbench's downloader so it can never reach the network."""
    if allowed:
        yield
        return
    names = [n for n in DOWNLOADERS if hasattr(rb_utils, n)]
    originals = {n: getattr(rb_utils, n) for n in names}

    def blocked(gdrive_id, fname_save):
        raise _DownloadBlocked(str(fname_save))

    for n in names:
        setattr(rb_utils, n, blocked)
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(rb_utils, n, f)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _missing_message(entry: ZooEntry, path: Path) -> str:
    urls = entry.urls
    where = f" Download it from {' and '.join(urls)}" if urls else " Download it"
    return (f"RobustBench model '{entry.name}' ({entry.dataset}, {entry.threat_model}) is not downloaded: "
            f"{path} does not exist.{where} and save it exactly at {path}, or enable downloads (needs "
            "internet) to have it fetched automatically.")


def _summarise_load_error(text: str) -> str:
    """Condense torch's ``load_state_dict`` error (which lists every key) into one sentence."""
    parts = []
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                       r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    if sizes:
        k, got, want = sizes[0]
        hint = " (a different number of classes?)" if k.endswith(("fc.weight", "fc.bias", "linear.weight",
                                                                  "linear.bias", "logits.weight", "logits.bias")) else ""
        parts.append(f"{len(sizes)} tensors have the wrong shape, e.g. {k}: file [{got}] vs model [{want}]{hint}")
    for what, label in (("Missing", "weights missing"), ("Unexpected", "unexpected weights")):
        m = re.search(what + r' key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)', text)
        if m:
            keys = re.findall(r'"([^"]*)"', m.group(1))
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    if not parts:
        detail = " ".join(text.split())
        return detail if len(detail) <= 300 else detail[:297] + "..."
    return "; ".join(parts)


#: Exception classes (by name, in requests / urllib3) that mean "the server could not be reached".
_NETWORK_CLASSES = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError", "NewConnectionError",
                    "NameResolutionError", "MaxRetryError", "ConnectTimeoutError", "ReadTimeoutError", "ProtocolError"}
#: ... and the messages they (or the OS) carry when wrapped in something else.
_NETWORK_TEXT = ("NameResolutionError", "Temporary failure in name resolution", "Name or service not known",
                 "nodename nor servname", "getaddrinfo failed", "Failed to establish a new connection",
                 "Max retries exceeded", "Network is unreachable", "No route to host", "Connection refused",
                 "timed out")


def _is_network_error(e: BaseException) -> bool:
    """True when ``e`` (or an exception it wraps) says the download server could not be reached: DNS
    failures, refused / reset / timed-out connections from socket, urllib, requests, urllib3 or gdown.
    An HTTP error *response* (the server answered) is not one."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 20:
        seen.add(id(cur))
        if isinstance(cur, urllib.error.HTTPError):
            return False
        if isinstance(cur, (socket.gaierror, socket.herror, socket.timeout, ConnectionError, TimeoutError,
                            urllib.error.URLError)):
            return True
        for k in type(cur).__mro__:
            if k.__module__.split(".")[0] in ("requests", "urllib3", "gdown") and k.__name__ in _NETWORK_CLASSES:
                return True
        if type(cur).__module__.split(".")[0] in ("requests", "urllib3", "gdown") and \
                any(t in str(cur) for t in _NETWORK_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _network_message(e: BaseException, entry: ZooEntry, files: list[Path]) -> str:
    urls = entry.urls
    where = "\n".join(str(p) for p in files) or "?"
    return (f"Downloading RobustBench model '{entry.name}' ({entry.dataset}, {entry.threat_model}) needs internet "
            f"access, and the download server could not be reached ({type(e).__name__}: {_first_line(e, 160)}). "
            f"Connect to the internet and try again, or download the file on another machine"
            f"{' from ' + ' and '.join(urls) if urls else ''} and put it by hand exactly at {where}; it then loads "
            "offline.")


def _translate(e: BaseException, entry: ZooEntry, files: list[Path]) -> ZooError:
    """A readable ZooError for whatever robustbench / torch raised."""
    text = str(e)
    label = f"'{entry.name}' ({entry.dataset}, {entry.threat_model})"
    if isinstance(e, _DownloadBlocked):
        return ZooError(_missing_message(entry, Path(text)))
    if _is_network_error(e):  # before the OSError branch: requests' errors are OSErrors too
        return ZooError(_network_message(e, entry, files))
    for p in files:
        kind = sniff_format(p)
        if kind not in _OK_FORMATS and kind != "missing":
            return ZooError(_bad_file_message(entry, p, kind))
    if "Weights only load failed" in text or "Unsupported global" in text:
        return ZooError(
            f"the checkpoint of {label} contains Python objects that would run code when unpickled, so it "
            "was refused: EnergyLens loads zoo weights with weights_only=True. If you trust the file, "
            "re-save only its tensors (its state_dict) with torch.save and load that instead.")
    if "Error(s) in loading state_dict" in text or "size mismatch" in text:
        return ZooError(f"the file for {label} does not match architecture {entry.architecture} "
                        f"(robustbench constructor {entry.constructor or '?'}): {_summarise_load_error(text)}. "
                        "Is it the checkpoint of another model?")
    if isinstance(e, KeyError):
        return ZooError(f"the checkpoint of {label} does not have the layout robustbench expects "
                        f"(missing key {text}); it is probably not the original file.")
    if "zip archive" in text or "unpickl" in text.lower() or "load key" in text or isinstance(e, EOFError):
        return ZooError(f"the checkpoint of {label} is corrupt or truncated ({_first_line(e)}); an "
                        f"interrupted download? Move it aside with core.zoo.quarantine() and download it again.")
    if isinstance(e, OSError):
        return ZooError(f"could not read or write the zoo folder for {label}: {_first_line(e)}")
    if type(e).__module__.startswith(("gdown", "requests", "urllib3")):
        urls = " or ".join(entry.urls)
        return ZooError(f"downloading {label} failed ({type(e).__name__}: {_first_line(e)}). Google Drive "
                        f"often limits downloads of popular files; try later or download it manually"
                        f"{' from ' + urls if urls else ''} and save it at {files[0] if files else '?'}.")
    return ZooError(f"loading RobustBench model {label} failed: {type(e).__name__}: {_first_line(e)}")


def load_zoo_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                   model_dir: str | os.PathLike = DEFAULT_ZOO_DIR, allow_download: bool = False,
                   device: str = "cpu"):
    """Load a RobustBench model with ``robustbench.utils.load_model``, safely.

    ``name``, ``dataset`` and ``threat_model`` are matched case-insensitively and passed to
    robustbench with its exact spelling. With the weights already at :func:`zoo_path` nothing
    touches the network. With ``allow_download=False`` (the default) a missing file raises
    :class:`ZooError` saying where to put it; with ``True`` robustbench downloads it (gdown).
    Files are always unpickled with ``weights_only=True``. Returns a
    :class:`~core.models.checkpoint.LoadedModel` in eval mode on ``device``; the model takes
    [0,1] images (normalisation, if any, is inside it).
    """
    entry = get_zoo_entry(name, dataset, threat_model)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ZooError(f"invalid device '{device}': {e}") from e
    files = zoo_files(entry, model_dir)
    if entry.hosted_on_hub and not allow_download:
        raise ZooError(f"RobustBench model '{entry.name}' is hosted on the Hugging Face hub via timm and has no "
                       "local .pt file; enable downloads (needs internet) to load it.")
    was_missing = []
    for p in files:
        kind = sniff_format(p)
        if kind == "missing":
            if not allow_download:
                raise ZooError(_missing_message(entry, p))
            was_missing.append(p)
        elif kind not in _OK_FORMATS:
            raise ZooError(_bad_file_message(entry, p, kind))


    rb_utils = import_robustbench_utils()
    with _load_lock, forced_weights_only(), _downloads(rb_utils, allow_download):
        try:
            model = rb_utils.load_model(model_name=entry.name, model_dir=str(model_dir),
                                        dataset=entry.dataset, threat_model=entry.threat_model)
        except Exception as e:  # noqa: BLE001 - everything becomes a readable ZooError
            err = _translate(e, entry, files)
            text = str(e)
            if not isinstance(e, _DownloadBlocked) and not was_missing and (
                    "Weights only load failed" in text or "Unsupported global" in text or "zip archive" in text
                    or "load key" in text or "unpickl" in text.lower() or isinstance(e, EOFError)):
                _remember_refusal(files, "refused")  # the listing no longer shows it as downloaded
            # A file this very call downloaded that turned out to be an HTML page (quota/login
            # page) is moved aside so that the next attempt downloads it again.
            moved = [quarantine(p) for p in was_missing if sniff_format(p) not in _OK_FORMATS + ("missing",)]
            if moved:
                err = ZooError(f"{err} The bad download was moved to {', '.join(str(m) for m in moved)}.")
            raise err from e
    try:
        model = model.eval().to(dev)
    except (RuntimeError, AssertionError) as e:
        raise ZooError(f"could not move '{entry.name}' to device '{device}': {_first_line(e)}") from e
    meta = ModelMeta(
        arch=entry.architecture, num_classes=entry.num_classes, dataset=entry.dataset,
        class_names=list(CIFAR10_CLASSES) if entry.dataset == "cifar10" else None,
        method="zoo", source="zoo", name=entry.name,
        hparams={"threat_model": entry.threat_model, "eps": entry.eps, "training": entry.training,
                 "robustbench_constructor": entry.constructor},
        metrics={"clean_acc": entry.clean_acc, "aa_acc": entry.aa_acc})
    return LoadedModel(model=model, meta=meta, path=files[0] if files else None)

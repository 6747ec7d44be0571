"""Where models come from: bundled checkpoints, local checkpoints and training runs, the zoo.

A :class:`ModelRef` names a model; :func:`load_model_ref` turns it into a LoadedModel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import zoo
from ..errors import CheckpointError, EnergyLensError
from ..paths import BUNDLED_DIR, DEFAULT_RUNS_DIR, LOCAL_DIR
from ..paths import runs_dir as _configured_runs_dir
from ..rundir import CHECKPOINT_FILES
from .checkpoint import LoadedModel, ModelMeta, load_checkpoint, read_metadata

RUNS_DIR = DEFAULT_RUNS_DIR
DEFAULT_MODEL = "cifar10-demo-plain"  # the bundled model the app opens on (non-robust, real CIFAR-10 images)
FALLBACK_MODEL = "digits-plain"       # ... when the CIFAR-10 demo pack is missing or corrupt

__all__ = ["ModelRef", "DEFAULT_MODEL", "FALLBACK_MODEL", "list_bundled", "list_local", "load_model_ref", "BUNDLED_DIR", "LOCAL_DIR", "RUNS_DIR",
           "checkpoint_entries"]


@dataclass(frozen=True)
class ModelRef:
    source: str                 # 'bundled' | 'local' | 'zoo'
    name: str                   # display name (zoo: RobustBench model name)
    path: str | None = None     # checkpoint file for bundled / local
    dataset: str | None = None  # zoo: 'cifar10' | 'cifar100'
    threat_model: str | None = None  # zoo: 'Linf' | 'L2'

    @property
    def key(self) -> str:
        return f"{self.source}:{self.path or ''}:{self.name}:{self.dataset or ''}:{self.threat_model or ''}"


def _runs_dir() -> Path:
    """The training-runs folder: env ``ENERGYLENS_RUNS`` (as in core.jobs) or ``<repo>/runs``."""
    return _configured_runs_dir()


def checkpoint_entries(paths, source: str, runs_dir: Path | None = None) -> list[tuple[ModelRef, ModelMeta | None, str | None]]:
    """``(ref, metadata, None)`` for each readable checkpoint file of ``paths`` (``source``: 'bundled' or 'local'),
    ``(ref, None, error)`` for an unreadable one: what :func:`list_bundled` and :func:`list_local` return."""
    out = []
    for p in paths:
        try:
            meta = read_metadata(p)
            err = None
        except EnergyLensError as e:
            meta, err = None, str(e)
        except Exception as e:  # noqa: BLE001 - no file may break a listing (or the model picker)
            meta, err = None, f"{p} could not be read ({type(e).__name__}: {str(e)[:200]})"
        name = meta.name if meta and meta.name else p.stem
        if source == "local" and runs_dir is not None and p.parent.parent == runs_dir:
            name = f"{p.parent.name}/{p.stem}"
        out.append((ModelRef(source, name, str(p)), meta, err))
    return out


def list_bundled(folder: Path | None = None):
    """Bundled checkpoints shipped in ``checkpoints/*.safetensors``: (ref, meta, error)."""
    folder = BUNDLED_DIR if folder is None else folder  # resolved per call (tests may point it elsewhere)
    return checkpoint_entries(sorted(Path(folder).glob("*.safetensors")), "bundled")


def list_local(local_dir: Path | None = None, runs_dir: Path | None = None):
    """User checkpoints in ``checkpoints/local`` and the best/last checkpoints of training runs.

    Defaults are resolved per call: :data:`LOCAL_DIR`, and env ``ENERGYLENS_RUNS`` or :data:`RUNS_DIR`.
    A file that cannot be read is listed with its error instead of raising.
    """
    local_dir = LOCAL_DIR if local_dir is None else local_dir
    runs_dir = _runs_dir() if runs_dir is None else Path(runs_dir)
    files = sorted(Path(local_dir).glob("*.safetensors")) if Path(local_dir).is_dir() else []
    if Path(runs_dir).is_dir():
        for run in sorted(Path(runs_dir).iterdir()):
            for f in CHECKPOINT_FILES:
                if (run / f).is_file():
                    files.append(run / f)
    return checkpoint_entries(files, "local", runs_dir)


def load_model_ref(ref: ModelRef, device: str = "cpu", allow_download: bool = False,
                   zoo_dir: Path | None = None) -> LoadedModel:
    if ref.source in ("bundled", "local"):
        if not ref.path:
            raise CheckpointError(f"model '{ref.name}' has no checkpoint path")
        lm = load_checkpoint(ref.path, device=device)
        lm.meta.source = ref.source
        return lm
    if ref.source == "zoo":
        kw = {"model_dir": zoo_dir} if zoo_dir is not None else {}
        return zoo.load_zoo_model(ref.name, ref.dataset or "cifar10", ref.threat_model or "Linf",
                                  allow_download=allow_download, device=device, **kw)
    raise CheckpointError(f"unknown model source '{ref.source}'")

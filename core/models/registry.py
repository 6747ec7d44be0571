"""Where models come from: bundled checkpoints, local checkpoints and training runs, the zoo.

A :class:`ModelRef` names a model; :func:`load_model_ref` turns it into a LoadedModel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, EnergyLensError
from .checkpoint import LoadedModel, ModelMeta, load_checkpoint, read_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DIR = REPO_ROOT / "checkpoints"
LOCAL_DIR = REPO_ROOT / "checkpoints" / "local"
RUNS_DIR = REPO_ROOT / "runs"

__all__ = ["ModelRef", "list_bundled", "list_local", "load_model_ref", "BUNDLED_DIR", "LOCAL_DIR", "RUNS_DIR"]


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


def _entries(paths, source: str) -> list[tuple[ModelRef, ModelMeta | None, str | None]]:
    out = []
    for p in paths:
        try:
            meta = read_metadata(p)
            err = None
        except EnergyLensError as e:
            meta, err = None, str(e)
        name = meta.name if meta and meta.name else p.stem
        if source == "local" and p.parent.parent == RUNS_DIR:
            name = f"{p.parent.name}/{p.stem}"
        out.append((ModelRef(source, name, str(p)), meta, err))
    return out


def list_bundled(folder: Path = BUNDLED_DIR):
    """Bundled checkpoints shipped in ``checkpoints/*.safetensors``: (ref, meta, error)."""
    return _entries(sorted(Path(folder).glob("*.safetensors")), "bundled")


def list_local(local_dir: Path = LOCAL_DIR, runs_dir: Path = RUNS_DIR):
    """User checkpoints in ``checkpoints/local`` and the best/last checkpoints of training runs."""
    files = sorted(Path(local_dir).glob("*.safetensors")) if Path(local_dir).is_dir() else []
    if Path(runs_dir).is_dir():
        for run in sorted(Path(runs_dir).iterdir()):
            for f in ("best.safetensors", "last.safetensors"):
                if (run / f).is_file():
                    files.append(run / f)
    return _entries(files, "local")


def load_model_ref(ref: ModelRef, device: str = "cpu", allow_download: bool = False,
                   zoo_dir: Path | None = None) -> LoadedModel:
    if ref.source in ("bundled", "local"):
        if not ref.path:
            raise CheckpointError(f"model '{ref.name}' has no checkpoint path")
        lm = load_checkpoint(ref.path, device=device)
        lm.meta.source = ref.source
        return lm
    if ref.source == "zoo":
        from .. import zoo

        kw = {"model_dir": zoo_dir} if zoo_dir is not None else {}
        return zoo.load_zoo_model(ref.name, ref.dataset or "cifar10", ref.threat_model or "Linf",
                                  allow_download=allow_download, device=device, **kw)
    raise CheckpointError(f"unknown model source '{ref.source}'")

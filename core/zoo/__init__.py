"""RobustBench model zoo: catalogue, download status and safe loading.

The catalogue lists the RobustBench CIFAR-10 / CIFAR-100 models for the ``Linf`` and ``L2``
threat models. Names, Google-Drive ids and constructors are read by *parsing* (``ast``) the
installed ``robustbench/model_zoo/cifar10.py`` and ``cifar100.py``; importing robustbench takes
seconds and pulls in timm/torchvision, so ``import core.zoo`` and :func:`list_zoo` never do it.
The catalogue is therefore exactly what the installed files offer: builds of robustbench 1.1.1
differ (one has the timm-hosted ``Debenedetti2022Light_XCiT-*`` entries commented out; see
:mod:`core.compat`), and a model the installed build lacks is reported as an unknown model, with
suggestions, like any other name. When parsing fails (robustbench missing or its layout changed)
a small built-in list of the paper's models is used instead.

Weights live where RobustBench itself puts them::

    <model_dir>/<dataset>/<threat_model>/<name>.pt        e.g. checkpoints/robustbench/cifar10/Linf/Standard.pt

so a folder filled by ``robustbench.utils.load_model(..., model_dir=...)`` elsewhere can be
reused as is. :func:`load_zoo_model` delegates the actual construction and loading to
``robustbench.utils.load_model`` (the reference loader, which handles the many per-model
checkpoint quirks) but first checks the files itself, so that the usual failures become
readable :class:`~core.errors.ZooError` messages instead of tracebacks:

* missing file while downloads are off -> the exact path to put it at and its Google-Drive URL;
* an HTML page saved as ``.pt`` (Google Drive quota/login page, RobustBench's infamous
  ``invalid load key, '<'``) -> refused before loading, with :func:`quarantine` to move it aside;
* a pickle that would run code -> refused: loading is forced to ``weights_only=True``;
* a file for another architecture -> "does not match architecture ...";
* a download without internet (DNS failure, refused or timed-out connection) -> "needs internet",
  with the URL and the exact path to put the file at by hand (never "could not read the folder").

The package is split by job: :mod:`~core.zoo.entries` (what an entry is, constants, the hand-kept
leaderboard table), :mod:`~core.zoo.parse` (reading robustbench's zoo files with ``ast``),
:mod:`~core.zoo.lookup` (the catalogue and finding an entry by name), :mod:`~core.zoo.files` (weight
paths, file status, quarantine) and :mod:`~core.zoo.load` (loading, with readable errors). Every public
name is importable from ``core.zoo``.
"""

from __future__ import annotations

from .entries import (CIFAR10_CLASSES, DATASETS, DEFAULT_ZOO_DIR, EPS, GDRIVE_URL, KNOWN, NUM_CLASSES, THREAT_MODELS,
                      ZooEntry, gdrive_url)
from .files import list_zoo, quarantine, zoo_files, zoo_path
from .load import DOWNLOADERS, load_zoo_model
from .lookup import (canonical_dataset, canonical_threat_model, catalogue, catalogue_source, get_zoo_entry,
                     robustbench_zoo_dir)

__all__ = ["ZooEntry", "DEFAULT_ZOO_DIR", "DATASETS", "THREAT_MODELS", "EPS", "list_zoo", "get_zoo_entry",
           "zoo_path", "zoo_files", "gdrive_url", "load_zoo_model", "quarantine", "catalogue_source",
           "canonical_dataset", "canonical_threat_model", "catalogue", "robustbench_zoo_dir", "DOWNLOADERS",
           "NUM_CLASSES", "CIFAR10_CLASSES", "GDRIVE_URL", "KNOWN"]

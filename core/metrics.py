"""Generation metrics: Inception Score, FID, KID (and optional LPIPS) for SGLD samples.

FID and KID are torchmetrics' (``torchmetrics.image``, imported lazily: it pulls in torchvision, torch-fidelity
and scipy); the features come from the project's extractors below, computed once per image set and fed to
torchmetrics, so IS, FID, KID and the floor share one pass over the images:

* ``inception_score(probs)``      IS = exp(E_x KL(p(y|x) || p(y))), mean and std over splits.
* ``fid_from_features(...)``      torchmetrics' ``FrechetInceptionDistance`` whose ``feature`` module passes the
                                  precomputed features through (:class:`PrecomputedFeatures`);
                                  ``frechet_distance(mu, S, ...)`` is its distance from given moments:
                                  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
* ``kid(...)``                    unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b/d + 1)^3 (torchmetrics'
                                  ``poly_mmd``), mean and std over random subsets (Binkowski et al. 2018). The
                                  subsets are drawn here with a seeded numpy generator (torchmetrics'
                                  ``KernelInceptionDistance`` draws them from torch's global generator).

Feature extractors. Every metric result says which network produced the features
(``result['features']``), because numbers from different extractors are not comparable:

* ``'inception-v3'``: the standard FID Inception network (pool3 2048-d features for FID/KID,
  its 1008-way unbiased logits for IS), via torch-fidelity, which ``torchmetrics[image]``
  installs. The weights are never downloaded by EnergyLens; put the file
  ``weights-inception-2015-12-05-6726825d.pth`` (from
  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth)
  at the path named by ``$ENERGYLENS_INCEPTION_WEIGHTS``, or in ``<repo>/checkpoints/inception/``,
  or in the torch hub cache (``<torch.hub.get_dir()>/checkpoints/``, where torch-fidelity itself
  saves it). The file is read with ``weights_only=True``: it must hold plain tensors.
* ``'classifier:<name>'``: any classifier's penultimate-layer activations (input of its last
  ``nn.Linear``) for FID/KID and its softmax for IS. Offline and fast, useful on small datasets
  (e.g. the embedded digits) where Inception features are meaningless anyway. IS is then at most
  the classifier's number of classes. The generating model's own features are never the default:
  SGLD optimises the samples for that model, and a robust model's features barely tell images apart
  (on CIFAR-10, Gaussian blobs score FID 0.97 against 0.56 for real images with a SAT SmallCNN's own
  features, 6.2 against 1.2 with an independent plain model's). :func:`independent_classifier` picks a
  bundled or local classifier of the same dataset that is not the generating model.

Every FID comes with its *real-vs-real floor* (``FID_floor``): the FID between two disjoint random
subsets of the real images, one as large as the generated set, computed with the same features. FID
is biased upwards for small samples, so a generated set can only be read against what real images of
that size score.

LPIPS (optional): mean LPIPS (AlexNet) between each generated image and a random real image of the
same class, as in the paper's Tab. 2b (lower = closer to the data). It needs torchmetrics and the
torchvision AlexNet ImageNet weights already in the torch hub cache; otherwise it is reported as
``None`` with the reason.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .errors import InputError
from .models.registry import list_bundled, list_local
from .paths import CHECKPOINTS_DIR, ENV_INCEPTION_WEIGHTS, setting
from .runtime import eval_mode
from .tensorio import atomic_torch_save, safe_torch_load

__all__ = [
    "INCEPTION_URL", "INCEPTION_FILENAME", "inception_weights_path", "inception_status",
    "feature_statistics", "frechet_distance", "fid_from_features", "PrecomputedFeatures", "polynomial_mmd2_unbiased",
    "kid",
    "inception_score", "inception_score_from_logits",
    "FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "load_inception", "choose_extractor",
    "lpips_status", "lpips_to_real", "generation_metrics", "real_fid_floor", "independent_classifier",
    "clear_inception_cache", "to_float01",
]

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_ENV = ENV_INCEPTION_WEIGHTS
INCEPTION_DIR = CHECKPOINTS_DIR / "inception"  # where a user may place the weights file


# =============================================================================================
# Statistics
# =============================================================================================
def _as_2d_float64(a, what: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (samples x dims), got shape {a.shape}")
    if a.shape[0] == 0:
        raise InputError(f"{what} is empty")
    if not np.isfinite(a).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return a


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of an (N, D) feature matrix, in float64."""
    f = _as_2d_float64(features, "features")
    if f.shape[0] < 2:
        raise InputError("at least 2 samples are needed to estimate a covariance")
    mu = f.mean(axis=0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


class PrecomputedFeatures(nn.Module):
    """The ``feature`` module handed to torchmetrics' ``FrechetInceptionDistance`` when the features were already
    computed by a :class:`FeatureExtractor`: it returns its input (N, D), in float64."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)   # read by torchmetrics instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (torchmetrics' FID formula):

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), clipped at 0 (rounding can leave -1e-12).
    """
    from torchmetrics.image.fid import _compute_fid  # lazy: heavy (torchvision, torch-fidelity, scipy: ~10 s)

    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise InputError(f"mean/covariance shapes do not match: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    for nm, a in (("mean", mu1), ("mean", mu2), ("covariance", s1), ("covariance", s2)):
        if not np.isfinite(a).all():
            raise InputError(f"{nm} contains NaN or infinite values")
    return float(max(float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))), 0.0))


def fid_from_features(f_real, f_fake) -> float:
    """FID between two feature sets (Gaussian fit of each): torchmetrics' ``FrechetInceptionDistance`` fed the
    features through :class:`PrecomputedFeatures`."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: heavy (torchvision, torch-fidelity, scipy)

    fr, ff = _as_2d_float64(f_real, "real features"), _as_2d_float64(f_fake, "generated features")
    if fr.shape[1] != ff.shape[1]:
        raise InputError(f"feature dimensions differ: {fr.shape[1]} (real) vs {ff.shape[1]} (generated)")
    if fr.shape[0] < 2 or ff.shape[0] < 2:
        raise InputError("at least 2 samples are needed to estimate a covariance")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(fr.shape[1]))
    metric.update(torch.from_numpy(fr), real=True)
    metric.update(torch.from_numpy(ff), real=False)
    return float(max(float(metric.compute()), 0.0))


def real_fid_floor(f_real, n: int, seed: int = 0) -> tuple[float, int] | tuple[None, int]:
    """FID between two disjoint random subsets of real features: ``m = min(n, N // 2)`` images against the other
    N − m. What a perfect generator of m images would score against (almost) the same reference: the floor
    to read a generated set's FID against. Returns (floor, m), or (None, m) with fewer than 2 images a side."""
    fr = _as_2d_float64(f_real, "real features")
    m = min(int(n), fr.shape[0] // 2)
    if m < 2 or fr.shape[0] - m < 2:
        return None, m
    perm = np.random.default_rng(seed).permutation(fr.shape[0])
    return fid_from_features(fr[perm[m:]], fr[perm[:m]]), m


def polynomial_mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) with k(a, b) = (a.b/d + coef0)^degree (torchmetrics'
    ``poly_kernel``). The estimator allows m != n (torchmetrics' ``poly_mmd`` assumes m == n; with equal sizes the
    two agree)."""
    from torchmetrics.image.kid import poly_kernel  # lazy: heavy (torchvision, torch-fidelity, scipy: ~10 s)

    x, y = _as_2d_float64(x, "x"), _as_2d_float64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise InputError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise InputError("the unbiased MMD needs at least 2 samples on each side")
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    kxx, kyy, kxy = (poly_kernel(a, b, degree, None, coef0) for a, b in ((tx, tx), (ty, ty), (tx, ty)))
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(f_real, f_fake, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> tuple[float, float, int]:
    """Kernel Inception Distance: unbiased polynomial MMD^2 (torchmetrics' ``poly_mmd``) averaged over random subsets.

    Each subset draws ``m = min(subset_size, n_real, n_fake)`` samples without replacement from both
    sets (a numpy generator seeded with ``seed``). Returns (mean, std over subsets, m).
    """
    from torchmetrics.image.kid import poly_mmd  # lazy: heavy (torchvision, torch-fidelity, scipy: ~10 s)

    fr, ff = _as_2d_float64(f_real, "real features"), _as_2d_float64(f_fake, "generated features")
    if fr.shape[1] != ff.shape[1]:
        raise InputError(f"feature dimensions differ: {fr.shape[1]} (real) vs {ff.shape[1]} (generated)")
    if int(subset_size) < 2 or int(n_subsets) < 1:
        raise InputError("KID needs subset_size >= 2 and n_subsets >= 1")
    m = min(int(subset_size), fr.shape[0], ff.shape[0])
    if m < 2:
        raise InputError("KID needs at least 2 real and 2 generated samples")
    rng = np.random.default_rng(seed)
    tr, tf = torch.from_numpy(fr), torch.from_numpy(ff)
    vals = np.array([float(poly_mmd(tr[torch.from_numpy(rng.choice(fr.shape[0], m, replace=False))],
                                    tf[torch.from_numpy(rng.choice(ff.shape[0], m, replace=False))]))
                     for _ in range(int(n_subsets))])
    return float(vals.mean()), float(vals.std()), m


def inception_score(probs, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) with p(y) the split's mean prediction; (mean, std) over splits.

    The samples are shuffled (``seed``; None keeps their order) before being cut into splits, so
    that class-ordered sample sets do not put one class per split. Equals 1 when every sample gets
    the same prediction and K when the predictions are confident (one-hot) and spread evenly over
    K classes.
    """
    p = _as_2d_float64(probs, "class probabilities")
    if (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise InputError("class probabilities must be non-negative and sum to 1 per sample")
    p = np.clip(p, 0.0, 1.0)
    n = p.shape[0]
    if seed is not None:
        p = p[np.random.default_rng(seed).permutation(n)]
    splits = max(1, min(int(splits), n))
    scores = []
    for part in np.array_split(np.arange(n), splits):
        q = p[part]
        py = q.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1.0)) - np.log(np.where(py > 0, py, 1.0))), 0.0)
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_logits(logits, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    lg = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()
    return inception_score(torch.softmax(lg, dim=1).numpy(), splits, seed)


# =============================================================================================
# Feature extractors
# =============================================================================================
@dataclass
class FeatureExtractor:
    """Turns images (N x C x H x W, float [0,1] or uint8) into (features (N, D), logits (N, K))."""

    label: str                      # 'inception-v3' | 'classifier:<name>'
    layer: str                      # human description of the feature layer
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    num_classes: int | None = None  # classes of the logits when they are the data's classes

    def extract(self, images: torch.Tensor, batch_size: int = 256,
                progress: Callable[[float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InputError("images must be a 4-D tensor N x C x H x W")
        if images.shape[0] == 0:
            raise InputError("no images given")
        feats, logits = [], []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                f, lg = self.fn(images[i:i + batch_size])
                feats.append(f.detach().double().cpu())
                logits.append(lg.detach().double().cpu())
                if progress is not None:
                    progress(min(1.0, (i + batch_size) / images.shape[0]))
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 divided by 255, floats as they are."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    u = x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if u.shape[1] == 1:
        u = u.repeat(1, 3, 1, 1)
    if u.shape[1] != 3:
        raise InputError(f"Inception features need 1- or 3-channel images, got {u.shape[1]} channels")
    return u


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features (input of the last ``nn.Linear``) and logits of a classifier."""

    def __init__(self, model: nn.Module, name: str, device: str | torch.device | None = None):
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
        last = None
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                last = mod
        store: dict[str, torch.Tensor] = {}

        def fn(x: torch.Tensor):

            x = to_float01(x).to(device)
            handle = None
            if last is not None:
                handle = last.register_forward_hook(lambda m, inp, out: store.__setitem__("f", inp[0].flatten(1)))
            try:
                with eval_mode(model):
                    logits = model(x)
            finally:
                if handle is not None:
                    handle.remove()
            f = store.pop("f", None)
            if f is None or f.shape[0] != x.shape[0]:
                f = logits
            return f, logits

        layer = f"penultimate ({last.in_features}-d, input of the last linear layer)" if last is not None else "logits"
        super().__init__(label=f"classifier:{name}", layer=layer, fn=fn, device=str(device),
                         num_classes=last.out_features if last is not None else None)


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's FID Inception-v3: pool3 features (2048-d) and 1008-way unbiased logits."""


def inception_weights_path() -> Path | None:
    """The first existing Inception weights file among the documented locations, else None."""
    cands = []
    env = setting(INCEPTION_ENV)
    if env:
        cands.append(env)
    cands.append(INCEPTION_DIR / INCEPTION_FILENAME)
    try:
        cands.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME)
    except Exception:  # noqa: BLE001 - a broken hub config just removes one candidate
        pass
    for c in cands:
        if c.is_file():
            return c
    return None


def inception_status() -> tuple[bool, str]:
    """(available, explanation) for the Inception feature extractor."""
    try:
        import torch_fidelity  # noqa: F401 - lazy: heavy optional (~1 s), only to tell whether it is installed
    except ImportError:
        return False, ("Inception features need torch-fidelity (`pip install torchmetrics[image]`); "
                       "using a classifier's features instead")
    p = inception_weights_path()
    if p is None:
        env = os.environ.get(INCEPTION_ENV)
        where = f" ({INCEPTION_ENV}={env} does not exist)" if env else ""
        return False, (f"Inception weights not found{where}. Download {INCEPTION_URL} and set {INCEPTION_ENV} "
                       "to its path (or put it in checkpoints/inception/); using a classifier's features instead")
    return True, f"Inception-v3 weights from {p}"


_INCEPTION_CACHE: dict[tuple[str, str], nn.Module] = {}


def clear_inception_cache() -> None:
    """Forget the Inception networks loaded so far (after the weights file changed); the next use reloads it."""
    _INCEPTION_CACHE.clear()


def load_inception(device: str | torch.device = "cpu") -> InceptionFeatures:
    """The FID Inception network from the local weights file; raises InputError when unavailable."""
    ok, why = inception_status()
    if not ok:
        raise InputError(why)
    path = inception_weights_path()
    key = (str(path), str(device))
    net = _INCEPTION_CACHE.get(key)
    if net is None:
        # lazy: heavy optional (torch-fidelity), only when Inception features are asked for
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3


        state = safe_torch_load(path)  # weights_only=True: refuses files that would run code
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path} does not hold a state_dict of tensors")
        # torch-fidelity reads its weights with weights_only=False; hand it a copy we wrote
        # ourselves from the safely loaded tensors, never the user's file.
        with tempfile.TemporaryDirectory(prefix="energylens-inception-") as tmp:
            clean = atomic_torch_save(Path(tmp) / "inception.pth", dict(state))
            try:
                net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                  feature_extractor_weights_path=str(clean))
            except RuntimeError as e:
                raise InputError(f"{path} is not the FID Inception-v3 weights file: {str(e).splitlines()[0]}") from e
        net = net.to(device).eval()
        _INCEPTION_CACHE[key] = net

    def fn(x: torch.Tensor):
        f, lg = net(_to_uint8_rgb(x).to(device))
        return f, lg

    return InceptionFeatures(label="inception-v3", layer="pool3 (2048-d); IS from the 1008-way unbiased logits",
                             fn=fn, device=str(device), notes=[f"Inception-v3 weights: {path}"])


PLAIN_METHODS = ("plain", "nat", "standard")


def _same_data(a: str | None, b: str | None) -> int | None:
    """0: the same dataset; 1: the same images under another name (``cifar10`` and ``cifar10-demo``); None: other."""
    a, b = str(a or "").strip().lower(), str(b or "").strip().lower()
    if not a or not b or a == "unknown" or b == "unknown":
        return None
    if a == b:
        return 0
    return 1 if a.split("-")[0] == b.split("-")[0] and not a.startswith("npz:") else None


def independent_classifier(generator_meta, generator_path=None, candidates=None):
    """A classifier to take generation-metric features from that is *not* the generating model: ``(ref, meta)``
    or None.

    Candidates are the bundled and local checkpoints (``candidates``: (ref, meta, error) triples as
    ``core.models.registry.list_bundled() + list_local()`` return them). Kept: the same input shape and data,
    the same dataset first, then the same images under another name (``cifar10-demo`` for ``cifar10``);
    classifiers of other datasets are never chosen (a digits model's features on CIFAR images ranked SGLD
    settings in the opposite order from a CIFAR model's, docs/METHODS.md). Among those, plain (not
    adversarially trained) models first: their features separate images more (Gaussian blobs vs real CIFAR
    images: FID ratio 5.3 against 1.7 for a SAT model's), then bundled before local, then by name.
    """
    if candidates is None:
        candidates = list_bundled() + list_local()
    gen_path = str(Path(generator_path).resolve()) if generator_path else None
    gen_name = getattr(generator_meta, "name", None)
    shape = list(getattr(generator_meta, "input_shape", None) or [])
    ranked = []
    for ref, meta, err in candidates:
        if meta is None or err:
            continue
        if ref.path and gen_path and str(Path(ref.path).resolve()) == gen_path:
            continue
        if not gen_path and gen_name and (meta.name or ref.name) == gen_name:
            continue
        tier = _same_data(meta.dataset, getattr(generator_meta, "dataset", None))
        if tier is None or list(meta.input_shape or []) != shape or meta.num_classes < 2:
            continue
        ranked.append(((tier, meta.method not in PLAIN_METHODS, ref.source != "bundled", ref.name), ref, meta))
    if not ranked:
        return None
    ranked.sort(key=lambda t: t[0])
    return ranked[0][1], ranked[0][2]


def choose_extractor(features: str = "auto", classifier: nn.Module | None = None, classifier_name: str = "model",
                     device: str | torch.device = "cpu") -> FeatureExtractor:
    """Pick a feature extractor.

    ``features``: 'inception' (error when unavailable), 'classifier' (always offline), or 'auto'
    (Inception when its weights are present, else the classifier, with a note saying why).
    """
    if features not in ("auto", "inception", "classifier"):
        raise InputError(f"features must be 'auto', 'inception' or 'classifier', got '{features}'")
    if features in ("auto", "inception"):
        ok, why = inception_status()
        if ok:
            return load_inception(device)
        if features == "inception":
            raise InputError(why)
        if classifier is None:
            raise InputError(why + " — and no classifier was given")
        ext = ClassifierFeatures(classifier, classifier_name, device)
        ext.notes.append(why)
        return ext
    if classifier is None:
        raise InputError("choose a classifier for classifier features")
    return ClassifierFeatures(classifier, classifier_name, device)


# =============================================================================================
# LPIPS (optional)
# =============================================================================================
def lpips_status(net: str = "alex") -> tuple[bool, str]:
    try:
        # lazy: heavy optional (torchmetrics + torchvision, seconds to import), only for LPIPS
        import torchmetrics.image  # noqa: F401
        import torchvision.models as tvm  # lazy: heavy optional (seconds to import), only for LPIPS
    except ImportError:
        return False, "LPIPS needs torchmetrics (`pip install torchmetrics[image]`)"
    weights = {"alex": tvm.AlexNet_Weights.IMAGENET1K_V1, "vgg": tvm.VGG16_Weights.IMAGENET1K_V1,
               "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1}.get(net)
    if weights is None:
        return False, f"unknown LPIPS network '{net}'"
    fname = weights.url.rsplit("/", 1)[-1]
    p = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not p.is_file():
        return False, (f"LPIPS needs the torchvision ImageNet weights {fname} in {p.parent} "
                       f"(download {weights.url}); skipped")
    return True, f"LPIPS ({net}) with {p}"


def lpips_to_real(fake: torch.Tensor, fake_labels, real: torch.Tensor, real_labels, *, net: str = "alex",
                  device: str | torch.device = "cpu", seed: int = 0, batch_size: int = 64) -> tuple[float | None, str]:
    """Mean LPIPS between each generated image and a random real image of its class, or (None, reason)."""
    ok, why = lpips_status(net)
    if not ok:
        return None, why
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity  # lazy: heavy optional (LPIPS)

    fl, rl = np.asarray(fake_labels), np.asarray(real_labels)
    rng = np.random.default_rng(seed)
    pair = np.empty(len(fl), dtype=np.int64)
    for c in np.unique(fl):
        pool = np.nonzero(rl == c)[0]
        if len(pool) == 0:
            return None, f"no real images of class {int(c)} to compare with"
        sel = np.nonzero(fl == c)[0]
        pair[sel] = rng.choice(pool, len(sel), replace=len(pool) < len(sel))
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True, reduction="sum").to(device)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(fl), batch_size):
            a = to_float01(fake[i:i + batch_size]).to(device)
            b = to_float01(real[torch.as_tensor(pair[i:i + batch_size])]).to(device)
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            total += float(metric(a, b))
            metric.reset()
    return total / len(fl), why


# =============================================================================================
# All metrics at once
# =============================================================================================
def generation_metrics(fake: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractor, *,
                       fake_labels=None, real_labels=None, is_splits: int = 10, kid_subset_size: int = 1000,
                       kid_subsets: int = 100, seed: int = 0, batch_size: int = 256, lpips: bool = False,
                       progress: Callable[[float, str], None] | None = None) -> dict:
    """IS (on the generated images), FID and KID (generated vs real), labelled with the extractor.

    Returns a JSON-ready dict: ``features`` (extractor label), ``feature_layer``, ``n_fake``,
    ``n_real``, ``IS``, ``IS_std``, ``FID``, ``FID_floor`` (:func:`real_fid_floor`: real vs real with
    ``FID_floor_n`` images on one side; None with fewer than 4 real images), ``KID``, ``KID_std``, ``KID_subset_size``,
    ``label_agreement`` (fraction of generated images the extractor classifies as their target class,
    classifier extractors only, else None), ``LPIPS`` (None unless requested and available) and
    ``LPIPS_note``, ``notes``.
    """
    if fake.shape[0] < 2 or real.shape[0] < 2:
        raise InputError("metrics need at least 2 generated and 2 real images")
    prog = progress or (lambda f, m: None)
    prog(0.0, f"features of {fake.shape[0]} generated images ({extractor.label})")
    ff, fl = extractor.extract(fake, batch_size, lambda f: prog(0.4 * f, "features of the generated images"))
    prog(0.4, f"features of {real.shape[0]} real images ({extractor.label})")
    fr, _ = extractor.extract(real, batch_size, lambda f: prog(0.4 + 0.4 * f, "features of the real images"))
    prog(0.8, "IS / FID / KID")
    is_mean, is_std = inception_score_from_logits(fl, is_splits, seed)
    kid_mean, kid_std, m = kid(fr, ff, kid_subset_size, kid_subsets, seed)
    floor, floor_n = real_fid_floor(fr, fake.shape[0], seed)
    out = {
        "features": extractor.label,
        "feature_layer": extractor.layer,
        "n_fake": int(fake.shape[0]),
        "n_real": int(real.shape[0]),
        "IS": is_mean,
        "IS_std": is_std,
        "IS_splits": int(max(1, min(is_splits, fake.shape[0]))),
        "FID": fid_from_features(fr, ff),
        "FID_floor": floor,
        "FID_floor_n": int(floor_n),
        "KID": kid_mean,
        "KID_std": kid_std,
        "KID_subset_size": m,
        "label_agreement": None,
        "LPIPS": None,
        "LPIPS_note": "not requested",
        "notes": list(extractor.notes),
    }
    if fake_labels is not None and extractor.num_classes is not None and fl.shape[1] == extractor.num_classes:
        yl = np.asarray(fake_labels).reshape(-1)
        if yl.shape[0] == fl.shape[0] and yl.size and yl.max() < fl.shape[1]:
            out["label_agreement"] = float((fl.argmax(axis=1) == yl).mean())
    if lpips:
        if fake_labels is None or real_labels is None:
            out["LPIPS_note"] = "LPIPS needs the labels of the generated and real images"
        else:
            prog(0.9, "LPIPS")
            out["LPIPS"], out["LPIPS_note"] = lpips_to_real(fake, fake_labels, real, real_labels,
                                                            device=extractor.device, seed=seed)
    prog(1.0, "metrics done")
    return out

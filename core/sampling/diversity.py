"""Within-class diversity of a set of images: the mean pairwise L2 distance between images of the same class.

FID rewards samples near the real feature distribution but not their variety: PCA-started SGLD chains of one class
can end as near-copies (the issue-23 measurement: 8.5 against 18.2 for real images of the same classes on the demo
pack) and still score a good FID. Shown next to every FID (SGLD page, batch job), measured the same way on real
images of the same classes, it tells whether the samples are as varied as the data.

Distances are in pixel space, images flattened and in [0, 1] (a 3 x 32 x 32 image: at most sqrt(3072) = 55.4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["within_class_diversity", "DIVERSITY_MAX_PER_CLASS"]

DIVERSITY_MAX_PER_CLASS = 500   # images per class at most (a seeded random subset): 124,750 pairs per class


def within_class_diversity(x, y, *, max_per_class: int | None = DIVERSITY_MAX_PER_CLASS,
                           seed: int = 0) -> dict[str, Any]:
    """Mean pairwise L2 distance between distinct images of the same class.

    ``x``: N x ... images in [0, 1] (tensor or array; uint8 is scaled by 1/255), ``y``: N labels. Classes with
    fewer than 2 images are left out. Returns ``mean`` (the unweighted mean over the classes, NaN when no class
    has 2 images), ``per_class`` {class: mean distance}, ``n_pairs`` (pairs used in all) and ``max_per_class``."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    y = np.asarray(torch.as_tensor(y).cpu()).reshape(-1)
    if x.shape[0] != len(y):
        raise InputError(f"got {len(y)} labels for {x.shape[0]} images")
    scale = 1 / 255.0 if x.dtype == torch.uint8 else 1.0
    x = x.detach().to("cpu").reshape(x.shape[0], -1)   # converted per class below (a large uint8 set stays small)
    rng = np.random.default_rng(seed)
    per_class: dict[int, float] = {}
    n_pairs = 0
    for c in sorted({int(v) for v in y}):
        idx = np.flatnonzero(y == c)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, int(max_per_class), replace=False))
        m = len(idx)
        if m < 2:
            continue
        xc = x[torch.from_numpy(idx)].to(torch.float64) * scale
        if not bool(torch.isfinite(xc).all()):
            raise InputError("images must be finite to measure their diversity")
        d = torch.cdist(xc, xc)
        iu = torch.triu_indices(m, m, offset=1)
        per_class[c] = float(d[iu[0], iu[1]].mean())
        n_pairs += m * (m - 1) // 2
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"mean": mean, "per_class": per_class, "n_pairs": n_pairs, "max_per_class": max_per_class}

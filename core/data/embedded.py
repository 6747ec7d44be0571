"""The embedded offline dataset: scikit-learn's bundled handwritten digits at 32 x 32 x 3.

No download is ever needed. 1,797 8x8 images (values 0..16) are upscaled with bilinear
interpolation to 32x32, replicated to 3 channels, quantised to uint8 and split 80/20 with a
fixed, stratified permutation (1,438 train / 359 test).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ImageDataset

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes seconds to import; only for this dataset

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


@lru_cache(maxsize=2)
def _split_indices(split: str) -> torch.Tensor:
    _, y = _digits_all()
    rng = np.random.RandomState(SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.nonzero(y.numpy() == c)[0]
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * TEST_FRACTION))].tolist())
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test] = True
    chosen = np.nonzero(test_mask if split == "test" else ~test_mask)[0]
    return torch.from_numpy(chosen)


def load_digits32(split: str) -> ImageDataset:
    x, y = _digits_all()
    idx = _split_indices(split)
    return ImageDataset("digits", split, x[idx].clone(), y[idx].clone(), [str(i) for i in range(10)])

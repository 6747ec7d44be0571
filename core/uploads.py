"""Decoding user-uploaded images safely.

Checks happen before any pixel is decoded: byte size, format (PNG/JPEG only, by content, not by
file name), and the pixel count read from the header (a decompression bomb is refused long before
Pillow's own 89-megapixel warning). The result is a float tensor 1 x 3 x H x W in [0, 1] resized
(shorter side, then centre crop) to the model's input size.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .errors import InputError

__all__ = ["decode_image", "MAX_UPLOAD_BYTES", "MAX_PIXELS"]

MAX_UPLOAD_BYTES = 10 * 1024 * 1024   # 10 MB
MAX_PIXELS = 16_000_000               # 16 megapixels (e.g. 4000 x 4000)
ALLOWED = {"PNG", "JPEG"}


def decode_image(data: bytes, size: tuple[int, int] = (32, 32), *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the uploaded file is empty")
    if len(data) > max_bytes:
        raise InputError(f"the file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own header check (> 2 x its 89 Mpx default)
        raise InputError(f"the image declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels; "
                         f"the limit is {max_pixels / 1e6:.0f} megapixels (very large or 'decompression bomb' "
                         "files are refused)") from e
    except UnidentifiedImageError as e:
        raise InputError("the file is not an image EnergyLens can read (PNG or JPEG expected)") from e
    except Exception as e:  # noqa: BLE001
        raise InputError(f"the image is corrupt or truncated and could not be opened ({e})") from e
    if im.format not in ALLOWED:
        raise InputError(f"unsupported image format {im.format}: upload a PNG or JPEG")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InputError("the image has no pixels")
    if w * h > max_pixels:
        raise InputError(f"the image is {w} x {h} = {w * h / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f} "
                         "megapixels (very large or 'decompression bomb' files are refused)")
    try:
        im.load()
        im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise InputError(f"the image data is corrupt or truncated: {e}") from e
    th, tw = size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - tw) // 2, (nh - th) // 2
    im = im.crop((left, top, left + tw, top + th))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)

"""Decoding user-uploaded images safely.

Checks happen before any pixel is decoded: byte size, format (PNG/JPEG, and MPO, the multi-picture
JPEG some cameras write, by content, not by file name), the pixel count, the aspect ratio and the
size after the short-side resize, all read from the header (a decompression bomb or a 1,000,000 x 1
strip is refused long before Pillow's own 89-megapixel warning). Decoding is bounded too: a JPEG is
decoded at a reduced scale when that still covers the model's input (``draft``), and the centre
crop is resized straight to the model's input size (never through a full-size intermediate), so any
accepted upload needs at most a few times its decoded size in memory.

The result is a float tensor 1 x 3 x H x W in [0, 1]: EXIF orientation applied, the shorter side
scaled to the model's input and the centre cropped. 16-bit grayscale is scaled from 0..65535, an
alpha channel is composited over white. What was done to the image that the user might not expect
(alpha, orientation, 16-bit, MPO) is appended to ``notes`` when a list is passed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError

__all__ = ["decode_image", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "MAX_ASPECT", "MAX_RESIZED_PIXELS", "MAX_SIDE"]

MAX_UPLOAD_BYTES = 10 * 1024 * 1024   # 10 MB
MAX_PIXELS = 16_000_000               # 16 megapixels (e.g. 4000 x 4000)
MAX_ASPECT = 20                       # longer side / shorter side (a 20:1 strip keeps 5% after the square crop)
MAX_RESIZED_PIXELS = 4_000_000        # the image after scaling its shorter side to the model's input
MAX_SIDE = 1024                       # largest model input side EnergyLens resizes to
ALLOWED = {"PNG", "JPEG", "MPO"}
_EXIF_ORIENTATION = 0x0112


def _transpose_for(orientation: int | None):
    """The Pillow transpose that undoes an EXIF orientation (2..8), or None."""
    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation or 1)


def _centre_box(w: int, h: int, tw: int, th: int) -> tuple[float, float, float, float]:
    """The centre region of a w x h image with the aspect ratio of tw x th (what scale + crop keeps)."""
    scale = max(th / h, tw / w)
    cw, ch = tw / scale, th / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


def decode_image(data: bytes, size: tuple[int, int] = (32, 32), *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS, notes: list[str] | None = None) -> torch.Tensor:
    """Decode an uploaded PNG/JPEG to a 1 x 3 x H x W float tensor for a model with input ``size`` (H, W).

    Raises :class:`InputError` naming the problem for anything it refuses; appends to ``notes`` what
    it changed about the image (alpha dropped onto white, EXIF rotation, 16-bit scaling, MPO frame)."""
    notes = [] if notes is None else notes
    try:
        th, tw = (int(s) for s in size)
    except (TypeError, ValueError) as e:
        raise InputError(f"the model's input size must be (height, width), got {size!r}") from e
    if not (0 < th <= MAX_SIDE and 0 < tw <= MAX_SIDE):
        raise InputError(f"the model's input size {th} x {tw} is not supported for uploads "
                         f"(each side 1..{MAX_SIDE})")
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
    aspect = max(w, h) / min(w, h)
    if aspect > MAX_ASPECT:
        raise InputError(f"the image is {w} x {h} pixels, an aspect ratio of {aspect:,.0f}:1; the limit is "
                         f"{MAX_ASPECT}:1 (the model sees a square crop: crop the image first)")
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        orientation = 1
    transpose = _transpose_for(orientation)
    # the model's input in the file's own orientation (a 90-degree EXIF rotation swaps the sides)
    sw, sh = (th, tw) if orientation in (5, 6, 7, 8) else (tw, th)
    scale = max(sh / h, sw / w)
    rw, rh = max(sw, round(w * scale)), max(sh, round(h * scale))
    if rw * rh > MAX_RESIZED_PIXELS:
        raise InputError(f"scaling the {w} x {h} image to the model's input would make it {rw} x {rh} pixels; the "
                         f"limit is {MAX_RESIZED_PIXELS / 1e6:.0f} megapixels (crop the image first)")
    if im.format == "MPO" and getattr(im, "n_frames", 1) > 1:
        notes.append(f"the file holds {im.n_frames} pictures (a multi-picture camera JPEG): the first is used")
    try:
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (rw, rh))  # DCT scaling: decode at 1/2..1/8 size when that still covers the input
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise InputError(f"the image data is corrupt or truncated: {e}") from e
    try:
        arr = _to_array(im, _centre_box(*im.size, sw, sh), (sw, sh), transpose, notes)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt data that only shows while converting
        raise InputError(f"the image data is corrupt or truncated: {e}") from e
    if transpose is not None:
        notes.append(f"rotated/flipped according to its EXIF orientation ({orientation})")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).unsqueeze(0)


def _to_array(im, box, out_size, transpose, notes: list[str]) -> np.ndarray:
    """Crop ``box`` of the decoded image, resize it to ``out_size`` (W, H), undo the EXIF orientation:
    float32 H x W x 3 in [0, 1]."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (32-bit 'I' as some Pillow versions open it): scale 0..65535 to 0..1 ('RGB' would
        # clip every value above 255 to white)
        try:  # resize the 16-bit image itself (Pillow does), converting only the small result: no 4-byte copy
            small = im.resize(out_size, Image.BILINEAR, box=box).convert("F")
        except (ValueError, OSError):  # a Pillow that cannot resize this mode
            small = im.convert("F").resize(out_size, Image.BILINEAR, box=box)
        if transpose is not None:
            small = small.transpose(transpose)
        a = np.asarray(small, dtype=np.float32)
        a = np.clip(a / 65535.0, 0.0, 1.0)
        notes.append("16-bit grayscale image: scaled from 0..65535")
        return np.repeat(a[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info) \
        or (mode in ("L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im if mode == "RGBA" else im.convert("RGBA")  # no full-size copy of an RGBA image
        small = rgba.resize(out_size, Image.BILINEAR, box=box)
        alpha = np.asarray(small.getchannel("A"), dtype=np.float32) / 255.0
        if float(alpha.min()) < 1.0:
            notes.append("the image has transparent areas (alpha channel): they are shown on white")
        white = Image.new("RGB", small.size, (255, 255, 255))
        white.paste(small.convert("RGB"), mask=small.getchannel("A"))
        small = white
    else:
        src = im if mode == "RGB" else im.convert("RGB")
        small = src.resize(out_size, Image.BILINEAR, box=box)
    if transpose is not None:
        small = small.transpose(transpose)
    return np.asarray(small, dtype=np.float32) / 255.0

"""Images (files, or their encoded bytes) decoded into uint8 arrays at the stored size.

The size policy: with ``size`` 0 an image keeps its own size (every image of a dataset must then
share one); with ``size`` S its shorter side is resized to S (bilinear, with torchvision's
``Resize(S)`` arithmetic) and the centre S x S is kept (``CenterCrop(S)``), so images of any size
and shape become one array, and a stored S = 256 centre-cropped to 224 at evaluation is exactly
the standard ImageNet evaluation transform.

Every mode is converted to RGB as Pillow does it (grayscale repeated, CMYK converted, the alpha
channel of RGBA dropped); a decode reports how many images of each mode it converted, which the
cache turns into one note. The functions here are what the cache runs on every core: Pillow
releases the GIL while it decodes, converts and resizes, so threads scale (`kdlab.data.cache`).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kdlab.data.pixels import channel_histogram
from kdlab.errors import UserError

MODE_NAMES = {"L": "grayscale", "LA": "grayscale with alpha", "1": "black-and-white", "P": "palette",
              "PA": "palette with alpha", "RGBA": "RGBA (alpha dropped)", "CMYK": "CMYK", "I;16": "16-bit",
              "I": "32-bit integer", "F": "floating-point", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}


@dataclass
class Decoded:
    """A chunk of decoded images, the histogram of its pixels and the modes it converted to RGB."""

    images: np.ndarray  # (k, H, W, 3) uint8
    histogram: np.ndarray  # (3, 256) int64 (`kdlab.data.pixels.channel_histogram`)
    converted: Counter = field(default_factory=Counter)  # mode name -> images converted from it
    examples: dict[str, str] = field(default_factory=dict)  # mode name -> the first such image


def fit(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear), then the centre `size` x `size`: torchvision's
    ``Resize(size)`` followed by ``CenterCrop(size)`` on a PIL image, to the pixel."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def read_image(source: str | Path | bytes, name: str, size: int) -> tuple[np.ndarray, str]:
    """One image as uint8 RGB HWC (at `size` x `size` when `size` > 0) and the mode it had; an
    image Pillow cannot read is a UserError naming it."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            mode = image.mode
            rgb = image.convert("RGB")
            if size:
                rgb = fit(rgb, size)
            return np.asarray(rgb, dtype=np.uint8), mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow reports unreadable, truncated and unsupported files through these.
        raise UserError(f"cannot read the image {name} ({exc}); fix or remove it") from None


def image_size_of(source: str | Path | bytes, name: str) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read the image {name} ({exc}); fix or remove it") from None


def decode_images(sources: Sequence[str | Path | bytes], names: Sequence[str], size: int,
                  shape: tuple[int, int], reference: str) -> Decoded:
    """Decode images into one (k, H, W, 3) array of the stored `shape`. With `size` 0 each must
    already have that shape: one that differs is a UserError naming it and `reference`, the image
    the shape was taken from."""
    images = np.empty((len(sources), *shape, 3), dtype=np.uint8)
    histogram = np.zeros((3, 256), dtype=np.int64)
    decoded = Decoded(images, histogram)
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        pixels, mode = read_image(source, name, size)
        if pixels.shape[:2] != shape:
            raise UserError(f"all images must share one size: {name} is {pixels.shape[1]}x{pixels.shape[0]} but "
                            f"{reference} is {shape[1]}x{shape[0]}; pass --set image_size=S to store every image "
                            "at S x S (shorter side to S, centre crop)")
        images[i] = pixels
        histogram += channel_histogram(pixels)
        if mode != "RGB":
            what = MODE_NAMES.get(mode, mode)
            decoded.converted[what] += 1
            decoded.examples.setdefault(what, name)
    return decoded


def resize_arrays(images: np.ndarray, size: int) -> Decoded:
    """Images already decoded (CIFAR's arrays), stored as they are or at `size` x `size`."""
    if size:
        images = np.stack([np.asarray(fit(Image.fromarray(np.asarray(image)), size)) for image in images])
    else:
        images = np.ascontiguousarray(images)
    return Decoded(images, channel_histogram(images))


def conversion_note(converted: Counter, examples: dict[str, str]) -> str | None:
    """One line about the images converted to RGB, or None if there were none."""
    if not converted:
        return None
    parts = ", ".join(f"{count:,} {mode}" for mode, count in converted.most_common())
    first = examples[converted.most_common(1)[0][0]]
    return f"converted images to RGB: {parts} (for example {first})"

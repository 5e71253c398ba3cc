"""Training augmentations made on the device from a few random draws, so that a batch is the same
whichever way its images reached the device (`kdlab.data.loader.DeviceLoader`,
`kdlab.data.stream.StreamLoader`).

* ``pad-crop`` (CIFAR's, the paper's): a 4-pixel zero pad, a random crop back to the stored size and
  a horizontal flip, drawn as one of 81 crops x 2 flips = 162 discrete "views" per example and
  applied as one gather (`augment_views`). Evaluation sees the centre view.
* ``random-resized-crop`` (ImageNet's, Szegedy et al. 2015, with torchvision's parameters): a crop
  of 8-100% of the stored image's area with an aspect ratio in [3/4, 4/3] (ten tries, then the whole
  image), resized to the training size (``crop_size``, else the stored size) and flipped half the
  time. The boxes of a batch are drawn from a generator seeded by (seed, epoch, batch) and applied
  as one bilinear ``grid_sample`` on the device, without antialiasing: crops come from images stored
  at about the training size, so they are rarely shrunk by more than the stored/training ratio.
  Evaluation sees the centre ``crop_size`` square of the stored image (with images stored at 256 px
  and crop_size 224, torchvision's ``Resize(256)`` + ``CenterCrop(224)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTATIONS = ("pad-crop", "random-resized-crop")

PAD = 4
CROPS_PER_AXIS = 2 * PAD + 1
NUM_VIEWS = CROPS_PER_AXIS * CROPS_PER_AXIS * 2
CENTER_VIEW = PAD * CROPS_PER_AXIS + PAD  # no shift, no flip: what evaluation sees

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_TRIES = 10


def augment_views(padded: Tensor, index: Tensor, view: Tensor, size: int, width: int | None = None) -> Tensor:
    """Crop and flip each selected padded image by its view id, as one gather on the device.

    view = (dy * 9 + dx) + 81 * flip, with dy, dx in 0..8 the crop's top-left corner in the padded
    image. Returns uint8 images of shape (B, C, size, width) (width: size unless given).
    """
    width = size if width is None else width
    shift = view % (CROPS_PER_AXIS * CROPS_PER_AXIS)
    dy, dx, flip = shift // CROPS_PER_AXIS, shift % CROPS_PER_AXIS, view >= CROPS_PER_AXIS * CROPS_PER_AXIS
    ar_y = torch.arange(size, device=padded.device)
    ar_x = ar_y if width == size else torch.arange(width, device=padded.device)
    rows = (dy[:, None] + ar_y[None, :])  # (B, size)
    cols_fwd = dx[:, None] + ar_x[None, :]
    cols = torch.where(flip[:, None], dx[:, None] + (width - 1 - ar_x)[None, :], cols_fwd)
    channels = torch.arange(padded.shape[1], device=padded.device)
    return padded[index[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None],
                  cols[:, None, None, :]]


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of one batch's random-resized-crop boxes: a function of (seed, epoch, batch) only."""
    return torch.Generator(device="cpu").manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + batch) % (1 << 63))


def resized_crop_boxes(gen: torch.Generator, count: int, height: int, width: int) -> Tensor:
    """(count, 5) float32 rows (x0, y0, w, h, flip) in pixels of a height x width image, drawn as
    torchvision's RandomResizedCrop.get_params and RandomHorizontalFlip draw them (vectorised)."""
    area = height * width
    scale = torch.empty(count, RRC_TRIES).uniform_(*RRC_SCALE, generator=gen)
    log_ratio = torch.empty(count, RRC_TRIES).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]),
                                                       generator=gen)
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * scale * ratio))
    h = torch.round(torch.sqrt(area * scale / ratio))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = fits.int().argmax(1)
    rows = torch.arange(count)
    w, h = w[rows, first], h[rows, first]
    # No try fits: the whole image, its ratio clamped to the range (torchvision's fallback).
    in_ratio = width / height
    whole_w = width if in_ratio <= RRC_RATIO[1] else round(height * RRC_RATIO[1])
    whole_h = height if in_ratio >= RRC_RATIO[0] else round(width / RRC_RATIO[0])
    none = ~fits.any(1)
    w, h = torch.where(none, float(whole_w), w), torch.where(none, float(whole_h), h)
    u, v = torch.rand(count, generator=gen), torch.rand(count, generator=gen)
    x0 = torch.floor(u * (width - w + 1)).clamp(max=width - w)
    y0 = torch.floor(v * (height - h + 1)).clamp(max=height - h)
    flip = (torch.rand(count, generator=gen) < 0.5).float()
    return torch.stack([x0, y0, w, h, flip], 1)


def resized_crop(images: Tensor, boxes: Tensor, out: tuple[int, int]) -> Tensor:
    """Each (C, H, W) uint8 image's box resized to `out` (bilinear) and mirrored where its flip is
    set: one affine grid_sample for the batch. Returns float32 (B, C, *out) on the 0-255 scale."""
    _, c, height, width = images.shape
    x0, y0, w, h, flip = boxes.to(images.device).unbind(1)
    # A pixel centre i of the output lands on x0 + (i + 0.5) * w / out of the input; in grid_sample's
    # normalised coordinates (align_corners=False) that is an affine map of the output's own.
    sx = torch.where(flip > 0, -w / width, w / width)
    theta = torch.zeros(len(boxes), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * x0 + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [len(boxes), c, *out], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def centre_crop(images: Tensor, out: tuple[int, int]) -> Tensor:
    """The centre `out` window of (B, C, H, W) images (torchvision's CenterCrop offsets)."""
    height, width = images.shape[-2:]
    top, left = int(round((height - out[0]) / 2.0)), int(round((width - out[1]) / 2.0))
    return images[..., top:top + out[0], left:left + out[1]]

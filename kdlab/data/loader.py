"""Batches made on the device: shuffled, augmented (`kdlab.data.augment`) and normalised there.

At CIFAR sizes a GPU trains faster than a CPU worker pool can decode and augment, so, as in
airbench, the whole split lives on the device as uint8 (`DeviceLoader`, the fast path). A split
too large for that streams from its memory-mapped cache (`kdlab.data.stream.StreamLoader`); which
one a run gets is decided by `kdlab.data.residency`, never by the loop. Both serve the same
batches for the same seed: the same order, the same augmentation draws and the same arithmetic
(`SplitLoader.make`), only the way the uint8 pixels reach the device differs. Every batch carries
the examples' indices and view ids, which is what lets teacher outputs be identified exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdlab.data.augment import (
    AUGMENTATIONS,
    CENTER_VIEW,
    CROPS_PER_AXIS,
    NUM_VIEWS,
    PAD,
    augment_views,
    batch_generator,
    centre_crop,
    resized_crop,
    resized_crop_boxes,
)
from kdlab.data.datasets import Split
from kdlab.data.pixels import channel_stats
from kdlab.errors import UserError

__all__ = ["Batch", "DeviceLoader", "SplitLoader", "augment_views", "channel_stats", "CENTER_VIEW", "CROPS_PER_AXIS",
           "NUM_VIEWS", "PAD"]

UPLOAD_CHUNK_BYTES = 64 << 20  # a resident split is copied to the device this many bytes at a time


@dataclass
class Batch:
    """One batch: normalised images, labels, which example and view each row is, and which rows are
    real (evaluation pads its last batch to the fixed batch size; training batches are all real)."""

    x: Tensor
    y: Tensor
    index: Tensor
    view: Tensor
    mask: Tensor | None = None  # None: every row is real

    def copy_(self, other: Batch) -> Batch:
        """Copy `other` into this batch's tensors in place (fixed buffers for CUDA graphs)."""
        for name in ("x", "y", "index", "view", "mask"):
            mine = getattr(self, name)
            if mine is not None:
                mine.copy_(getattr(other, name))
        return self

    def clone(self) -> Batch:
        """A batch with tensors of its own, of the same shapes and memory format."""
        return Batch(*(None if t is None else t.clone() for t in (self.x, self.y, self.index, self.view, self.mask)))


class SplitLoader:
    """What both residencies share: batch geometry, shuffling, augmentation draws and the arithmetic
    that turns uint8 pixels on the device into a normalised batch.

    The order and augmentations of epoch e depend only on (seed, e), so a resumed run sees exactly
    the batches it would have seen without the interruption. With `shard=(rank, world)` (one run on
    several processes) every batch is the same global batch, and this process gets its slice of it:
    rows rank * B/world to (rank + 1) * B/world. `augmentation` is pad-crop or random-resized-crop
    (`kdlab.data.augment`); `crop_size` > 0 trains and evaluates on crops of that side.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, *, train: bool,
                 mean: list[float], std: list[float], seed: int = 0, augment: bool = True,
                 channels_last: bool = False, limit: int = 0, shard: tuple[int, int] = (0, 1),
                 augmentation: str = "pad-crop", crop_size: int = 0):
        if augmentation not in AUGMENTATIONS:
            raise UserError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
        self.split = split
        self.n = min(limit, len(split)) if limit else len(split)
        self.train, self.augment = train, augment and train
        # Static batch shapes (drop the last partial batch in training) keep compiled graphs reusable;
        # a split smaller than one batch becomes one batch.
        self.batch_size = min(batch_size, self.n)
        self.rank, world = shard
        if world > 1 and not train:
            self.batch_size = -(-self.batch_size // world) * world  # evaluation pads: any size will do
        if self.batch_size % world:
            raise UserError(f"the batch size ({self.batch_size}) must be a multiple of the number of processes "
                            f"({world}), so that each process gets an equal share of every batch")
        self.rows = self.batch_size // world  # this process's share of each batch
        self.seed, self.device, self.channels_last = seed, device, channels_last
        self.pad_crop = augmentation == "pad-crop"
        self.stored = tuple(split.images.shape[1:3])
        self.out = (crop_size, crop_size) if crop_size else self.stored
        check_crop(self.stored, crop_size, augmentation)
        self.pad = PAD if self.augment and self.pad_crop else 0  # what the uint8 images are padded by
        self.eval_view = CENTER_VIEW if self.pad_crop else 0
        self.labels = torch.from_numpy(np.asarray(split.labels[:self.n], dtype=np.int64)).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
        self.size = self.stored[0]

    def __len__(self) -> int:
        if self.train:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def epoch_draws(self, epoch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The epoch's order and per-example view ids (on `device`), drawn from (seed, epoch)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).to(device)
        if self.augment and self.pad_crop:
            views = torch.randint(0, NUM_VIEWS, (self.n,), generator=gen).to(device)
        elif self.augment:  # random-resized-crop: the boxes are drawn per batch; (index, epoch) names them
            views = torch.full((self.n,), epoch + 1, device=device)
        else:
            views = torch.full((self.n,), self.eval_view, device=device)
        return order, views

    def make(self, images: Tensor, rows: Tensor | None, index: Tensor, view: Tensor, mask: Tensor,
             epoch: int, batch: int) -> Batch:
        """The batch of `rows` of the uint8 (N, C, H + 2 pad, W + 2 pad) `images` on the device (all of
        them when `rows` is None): augmented for training, centre-cropped for evaluation, normalised."""
        if self.augment and self.pad_crop:
            rows = rows if rows is not None else torch.arange(len(index), device=images.device)
            x = augment_views(images, rows, view, *self.stored)
        elif self.augment:
            chosen = images if rows is None else images[rows]
            boxes = resized_crop_boxes(batch_generator(self.seed, epoch, batch), self.batch_size, *self.stored)
            x = resized_crop(chosen, boxes[self.rank * self.rows:(self.rank + 1) * self.rows], self.out)
        else:
            x = images if rows is None else images[rows]
            if self.out != self.stored:
                x = centre_crop(x, self.out)
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(x=x, y=self.labels[index], index=index, view=view, mask=mask)


def check_crop(stored: tuple[int, ...], crop_size: int, augmentation: str) -> None:
    """crop_size must fit the stored images, and pad-crop trains at the stored size."""
    if not crop_size:
        return
    if augmentation == "pad-crop":
        raise UserError("crop_size needs augmentation=random-resized-crop (pad-crop trains at the stored size)")
    if crop_size > min(stored):
        raise UserError(f"crop_size {crop_size} is larger than the stored images ({stored[1]}x{stored[0]}); "
                        "store them larger with --set image_size=S, or crop less")


class DeviceLoader(SplitLoader):
    """Serves a split in batches from device memory: the whole split is copied there once as uint8
    (padded for pad-crop), in chunks, so that a memory-mapped cache never becomes a host copy on the
    way to a GPU. Each batch is then one gather and one normalisation on the device."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, **options):
        super().__init__(split, batch_size, device, **options)
        h, w, p = *self.stored, self.pad
        self.images = (torch.zeros if p else torch.empty)((self.n, 3, h + 2 * p, w + 2 * p), dtype=torch.uint8,
                                                          device=device)
        step = max(1, UPLOAD_CHUNK_BYTES // (h * w * 3))
        for start in range(0, self.n, step):
            stop = min(start + step, self.n)
            chunk = torch.from_numpy(np.ascontiguousarray(split.images[start:stop])).to(device)
            self.images[start:stop, :, p:p + h, p:p + w] = chunk.permute(0, 3, 1, 2)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch (0-based), in a fixed order for (seed, epoch)."""
        if not self.train:
            # Every batch has the full size (fixed shapes): the last one is padded with repeats of the
            # last image, and its mask marks the real rows.
            for b, start in enumerate(range(0, self.n, self.batch_size)):
                first = start + self.rank * self.rows
                rows = torch.arange(first, first + self.rows, device=self.device)
                index = rows.clamp(max=self.n - 1)
                yield self.make(self.images, index, index, torch.full_like(index, self.eval_view), rows < self.n,
                                0, b)
            return
        order, views = self.epoch_draws(epoch, self.device)
        real = torch.ones(self.rows, dtype=torch.bool, device=self.device)
        for b in range(len(self)):
            first = b * self.batch_size + self.rank * self.rows
            index = order[first:first + self.rows]
            yield self.make(self.images, index, index, views[index], real, epoch, b)

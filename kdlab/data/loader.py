"""Batches made on the device: the whole split lives there as uint8, augmented by index arithmetic.

At CIFAR sizes a GPU trains faster than a CPU worker pool can decode and augment, so, as in
airbench, the data pipeline lives on the device. Augmentation is the standard random crop
(4-pixel zero pad) and horizontal flip, drawn as discrete choices: each training example is seen
as one of 81 crops x 2 flips = 162 "views", and every batch carries the view ids beside the
example indices, which is what lets teacher outputs be cached and shared exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdlab.data.datasets import Split
from kdlab.errors import UserError

PAD = 4
CROPS_PER_AXIS = 2 * PAD + 1
NUM_VIEWS = CROPS_PER_AXIS * CROPS_PER_AXIS * 2
CENTER_VIEW = PAD * CROPS_PER_AXIS + PAD  # no shift, no flip: what evaluation sees


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


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 HWC images, on the 0-1 scale (chunked, so
    50,000 images never become one float64 copy)."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    count = images.size // images.shape[-1]
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12)).tolist()


class DeviceLoader:
    """Serves a split in batches from device memory, shuffled and augmented per epoch.

    The order and augmentations of epoch e depend only on (seed, e), so a resumed run sees exactly
    the batches it would have seen without the interruption. With `shard=(rank, world)` (one run on
    several processes) every batch is the same global batch, and this process gets its slice of it:
    rows rank * B/world to (rank + 1) * B/world.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device, *, train: bool,
                 mean: list[float], std: list[float], seed: int = 0, augment: bool = True,
                 channels_last: bool = False, limit: int = 0, shard: tuple[int, int] = (0, 1)):
        images, labels = split.images, split.labels
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.n = len(labels)
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
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        if self.augment:
            x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
        self.images = x.to(device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
        self.size = images.shape[1]

    def __len__(self) -> int:
        if self.train:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch (0-based), in a fixed order for (seed, epoch)."""
        if not self.train:
            # Every batch has the full size (fixed shapes): the last one is padded with repeats of the
            # last image, and its mask marks the real rows.
            for start in range(0, self.n, self.batch_size):
                first = start + self.rank * self.rows
                rows = torch.arange(first, first + self.rows, device=self.device)
                index = rows.clamp(max=self.n - 1)
                yield self._make(index, torch.full_like(index, CENTER_VIEW), rows < self.n)
            return
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=gen).to(self.device)
        if self.augment:
            views = torch.randint(0, NUM_VIEWS, (self.n,), generator=gen).to(self.device)
        else:
            views = torch.full((self.n,), CENTER_VIEW, device=self.device)
        real = torch.ones(self.rows, dtype=torch.bool, device=self.device)
        for b in range(len(self)):
            first = b * self.batch_size + self.rank * self.rows
            index = order[first:first + self.rows]
            yield self._make(index, views[index], real)

    def _make(self, index: Tensor, view: Tensor, mask: Tensor) -> Batch:
        x = augment_views(self.images, index, view, self.size) if self.augment else self.images[index]
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(x=x, y=self.labels[index], index=index, view=view, mask=mask)


def augment_views(padded: Tensor, index: Tensor, view: Tensor, size: int) -> Tensor:
    """Crop and flip each selected padded image by its view id, as one gather on the device.

    view = (dy * 9 + dx) + 81 * flip, with dy, dx in 0..8 the crop's top-left corner in the padded
    image. Returns uint8 images of shape (B, C, size, size).
    """
    shift = view % (CROPS_PER_AXIS * CROPS_PER_AXIS)
    dy, dx, flip = shift // CROPS_PER_AXIS, shift % CROPS_PER_AXIS, view >= CROPS_PER_AXIS * CROPS_PER_AXIS
    ar = torch.arange(size, device=padded.device)
    rows = (dy[:, None] + ar[None, :])  # (B, size)
    cols_fwd = dx[:, None] + ar[None, :]
    cols = torch.where(flip[:, None], dx[:, None] + (size - 1 - ar)[None, :], cols_fwd)
    channels = torch.arange(padded.shape[1], device=padded.device)
    return padded[index[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None],
                  cols[:, None, None, :]]

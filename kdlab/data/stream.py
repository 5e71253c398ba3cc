"""Batches streamed from the memory-mapped cache, for splits too large to live on the device.

Per batch, a background thread reads the batch's rows of the uint8 cache file (a read of each image,
served by the page cache or the disk, with ``pread``: the file is never mapped into the process, so
its pages do not count as the process's memory) into one of a few reusable host buffers, pinned on
a GPU machine so that the copy to the device is asynchronous; the device then pads, crops, flips and
normalises it with the same code and the same draws as `DeviceLoader` (`SplitLoader.make`), so the
same seed gives the same batches in both residencies. `PREFETCH` batches are gathered ahead while
the training step runs. Host memory is the buffers (PREFETCH x batch x image bytes) plus the pages
of the cache the kernel keeps, which it can drop: it does not grow with the dataset.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from kdlab.data.datasets import Split
from kdlab.data.loader import Batch, SplitLoader

PREFETCH = 4  # batches gathered ahead of the one being trained on
GATHER_THREADS = 4  # at most (and one per core): reads of the cache file, outside the GIL


class StreamLoader(SplitLoader):
    """Serves a split in batches gathered from its memory-mapped cache on background threads (the
    same interface, and the same batches, as `DeviceLoader`)."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, **options):
        super().__init__(split, batch_size, device, **options)
        self.images = split.images  # the memory map: nothing is read until a batch needs it
        self.threads = max(1, min(GATHER_THREADS, os.cpu_count() or 1))
        self.file = _whole_file(split.images)

    def _gather(self, fd: int | None, out: np.ndarray, index: np.ndarray) -> None:
        """Rows `index` of the split into `out`: read from the cache file (runs of consecutive rows in
        one call), or gathered from an array in memory."""
        if fd is None:
            np.take(self.images, index, axis=0, out=out, mode="clip")
            return
        row = out[0].nbytes
        flat = out.reshape(len(out), -1)
        start = 0
        while start < len(index):
            stop = start + 1
            while stop < len(index) and index[stop] == index[stop - 1] + 1:
                stop += 1
            _pread(fd, memoryview(flat[start:stop]).cast("B"), int(index[start]) * row)
            start = stop

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch (0-based), in a fixed order for (seed, epoch)."""
        yield from self._stream(len(self), self._rows(epoch), epoch)

    def _rows(self, epoch: int) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
        """Batch number -> its dataset rows, view ids and real-row mask, on the host (where the rows are read)."""
        if not self.train:
            def evaluation(b: int) -> tuple[Tensor, Tensor, Tensor]:
                first = b * self.batch_size + self.rank * self.rows
                rows = torch.arange(first, first + self.rows)
                index = rows.clamp(max=self.n - 1)
                return index, torch.full_like(index, self.eval_view), rows < self.n

            return evaluation
        order, views = self.epoch_draws(epoch, torch.device("cpu"))
        real = torch.ones(self.rows, dtype=torch.bool)

        def training(b: int) -> tuple[Tensor, Tensor, Tensor]:
            first = b * self.batch_size + self.rank * self.rows
            index = order[first:first + self.rows]
            return index, views[index], real

        return training

    def _stream(self, count: int, rows_of: Callable[[int], tuple[Tensor, Tensor, Tensor]],
                epoch: int) -> Iterator[Batch]:
        cuda = self.device.type == "cuda"
        slots = [torch.empty((self.rows, *self.stored, 3), dtype=torch.uint8, pin_memory=cuda)
                 for _ in range(min(PREFETCH, count))]
        copied: list[torch.cuda.Event | None] = [None] * len(slots)  # when each slot's copy to the device is done

        def gather(slot: int, index: Tensor) -> int:
            event = copied[slot]
            if event is not None:
                event.synchronize()  # the device has read this buffer's previous batch
            self._gather(fd, slots[slot].numpy(), index.numpy())
            return slot

        fd = os.open(self.file, os.O_RDONLY) if self.file else None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kdlab-stream")
        pending: deque[Future] = deque(pool.submit(gather, k, rows_of(k)[0]) for k in range(len(slots)))
        try:
            for b in range(count):
                index, view, mask = rows_of(b)
                slot = pending.popleft().result()
                host = slots[slot]
                images = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
                if cuda:
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record()
                if self.pad:
                    images = torch.nn.functional.pad(images, (self.pad,) * 4)
                batch = self.make(images, None, index.to(self.device, non_blocking=True),
                                  view.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True),
                                  epoch, b)
                if b + len(slots) < count:  # on a CPU `make` has copied the pixels: the buffer is free
                    pending.append(pool.submit(gather, slot, rows_of(b + len(slots))[0]))
                yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            if fd is not None:
                os.close(fd)


def _whole_file(images: np.ndarray) -> str | None:
    """The file a memory-mapped split is, when the map is that whole file (the decoded cache's
    splits are): rows can then be read from it directly."""
    name = getattr(images, "filename", None)
    if not name or getattr(images, "offset", 1) != 0 or not images.flags.c_contiguous:
        return None
    try:
        return name if os.path.getsize(name) == images.nbytes else None
    except OSError:
        return None


def _pread(fd: int, buffer: memoryview, offset: int) -> None:
    while len(buffer):
        got = os.preadv(fd, [buffer], offset)
        if got <= 0:
            raise OSError(f"the decoded cache ended early (offset {offset}): delete it to decode again")
        buffer, offset = buffer[got:], offset + got

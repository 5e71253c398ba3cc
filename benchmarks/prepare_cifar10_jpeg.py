#!/usr/bin/env python3
"""Write the JPEG copy of CIFAR-10 in the official python layout, decoding on every core.

    python3 benchmarks/prepare_cifar10_jpeg.py SCRIPT_DIR OUT_DIR

SCRIPT_DIR holds the copy's `make_cifar10_batches.py` and `cifar10_jpeg.npz` (for example
`../shared/datasets/cifar10-jpeg`, or the `.data/cifar10-jpeg` carried to a GPU machine). Its own
script decodes the 60,000 JPEGs on one core (about 17 s on the H200 machine); this one runs that
same script with its `decode` spread over a process pool, so the files it writes are the same.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _decode_range(blob: bytes, offsets: np.ndarray) -> np.ndarray:
    rows = np.empty((len(offsets) - 1, 3072), np.uint8)
    for i in range(len(offsets) - 1):
        img = Image.open(io.BytesIO(blob[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]])).convert("RGB")
        rows[i] = np.asarray(img, np.uint8).transpose(2, 0, 1).reshape(-1)
    return rows


def parallel_decode(pack, split: str) -> tuple[np.ndarray, np.ndarray]:
    """What the script's `decode(pack, split)` returns, computed in chunks on a process pool."""
    blob, offs = pack[f"{split}_jpeg"], pack[f"{split}_offsets"]
    n = len(offs) - 1
    bounds = np.linspace(0, n, min(n, 4 * (os.cpu_count() or 1)) + 1).astype(int)
    jobs = [(blob[offs[a]:offs[b]].tobytes(), offs[a:b + 1]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with ProcessPoolExecutor() as pool:
        parts = list(pool.map(_decode_range, *zip(*jobs, strict=True)))
    return np.concatenate(parts), pack[f"{split}_labels"].astype(np.int64)


def main(script_dir: str, out_dir: str) -> None:
    t0 = time.perf_counter()
    spec = importlib.util.spec_from_file_location("make_cifar10_batches", Path(script_dir) / "make_cifar10_batches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.decode = parallel_decode  # the rest (order, layout, metadata) is the script's own
    module.main(out_dir)
    print(f"decoded and written in {time.perf_counter() - t0:.1f}s on {os.cpu_count()} cores")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

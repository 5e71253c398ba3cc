"""The CIFAR fast path's loader, before and after a change, alternated in one process on one device.

    git archive <old commit> | tar -x -C /tmp/kdlab-before      # the previous kdlab, unpacked
    python benchmarks/loader_before_after.py --before /tmp/kdlab-before [--device cuda] [--reps 8]

Builds `DeviceLoader` for 50,000 random CIFAR-shaped images (batch 512, pad-crop, as the fast preset
trains) from both versions and times building it (the copy to the device) and one epoch of
batches, the two versions' batches in turn, synchronising the device after each; checks that both
give the same batches. Prints the
medians and the ratios new / old as JSON. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlab.data.datasets import Split  # noqa: E402
from kdlab.data.loader import DeviceLoader  # noqa: E402


def _old_loader(root: Path) -> type:
    spec = importlib.util.spec_from_file_location("kdlab_before_loader", root / "kdlab" / "data" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.DeviceLoader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="an unpacked checkout of the previous kdlab")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 10, 50000).astype(np.int64))
    options = dict(train=True, mean=[0.5] * 3, std=[0.25] * 3, seed=0)
    versions = {"old": _old_loader(Path(args.before)), "new": DeviceLoader}
    times: dict[str, list[float]] = {f"{v}_{w}": [] for v in versions for w in ("build", "epoch")}
    for rep in range(args.reps):
        loaders = {}
        for name in (list(versions) if rep % 2 == 0 else list(reversed(versions))):
            sync()
            t0 = time.perf_counter()
            loaders[name] = versions[name](split, args.batch, device, **options)
            sync()
            times[f"{name}_build"].append(time.perf_counter() - t0)
        # Batch by batch, the two loaders in turn: a change in the machine's load hits both alike.
        epochs = {name: loader.epoch(rep) for name, loader in loaders.items()}
        spent = dict.fromkeys(versions, 0.0)
        for b in range(len(loaders["new"])):
            for name in (list(versions) if b % 2 == 0 else list(reversed(versions))):
                t0 = time.perf_counter()
                next(epochs[name])
                sync()
                spent[name] += time.perf_counter() - t0
        for name, seconds in spent.items():
            times[f"{name}_epoch"].append(seconds)
    old, new = (versions[v](split, args.batch, device, **options) for v in ("old", "new"))
    same = all(torch.equal(a.x, b.x) and torch.equal(a.index, b.index)
               for a, b in zip(old.epoch(1), new.epoch(1), strict=True))
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = [n / o for n, o in zip(times["new_epoch"], times["old_epoch"], strict=True)]
    print(json.dumps({"device": str(device), "reps": args.reps, "same_batches": same, "median_s": median,
                      "epoch_new_over_old": median["new_epoch"] / median["old_epoch"],
                      "build_new_over_old": median["new_build"] / median["old_build"],
                      "epoch_ratio_per_rep": ratios},
                     indent=1))


if __name__ == "__main__":
    main()

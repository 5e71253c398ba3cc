"""DKD on a small 10-class set, through the grid as a user runs it (issue 17, item 5).

The data: scikit-learn's 8x8 digits (1,797 images, 10 classes), upsampled to 32x32 RGB and split
1,437 train / 360 test (random_state 0), written as an image folder. The study: the smoke preset's
recipe for 15 epochs, a resnet18@0.5 teacher per seed, the vgg16@0.125 student alone, with KD, with
DKD at kdlab's defaults (`scale=auto`: alpha and beta x min(1, 0.01/lr), 0.1 at this lr), and with
DKD at the authors' CIFAR-100 weights (`scale=1`: alpha 1, beta 8), which left the student at
chance before. Prints each run (final accuracy, training accuracy, health) and a summary per
variant, and writes them as JSON.

    pip install scikit-learn            # the digits (not a kdlab dependency)
    python benchmarks/dkd_small_data.py --seeds 3 --workers 2 --out benchmarks/results

About 40 minutes on 2 CPU cores for 3 seeds (the teachers take most of it). The runs dir is kept:
run it again to print the results without training.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_digits(root: Path) -> Path:
    """The digits as a 32x32 RGB image folder (train/<class>/*.png, test/<class>/*.png)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this benchmark reads scikit-learn's digits: pip install scikit-learn")
    import torch
    from PIL import Image

    if (root / "train").exists():
        return root
    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0 * 255.0)[:, None].float()
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = images.clamp(0, 255).round().byte()[:, 0].numpy()
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, random_state=0)
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            folder = root / split / f"digit{y}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(x[..., None], 3, axis=-1)).save(folder / f"{i:04d}.png")
    return root


def grid(data: Path, runs: Path, seeds: int, workers: int, methods: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "kdlab", "grid", "--preset", "smoke", "--epochs", "15", "--teachers", "resnet18@0.5",
           "--students", "vgg16@0.125", "--methods", methods, "--seeds", str(seeds), "--dataset", str(data),
           "--runs-dir", str(runs), "--workers", str(workers), "--quiet", "--set", "tensorboard=false", *extra]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=False)  # a run flagged as not learning makes the grid exit 1: read the store


def variant(config: dict) -> str:
    if config["method"] == "ce":
        return "ce" if config["model"] == "vgg16" else "teacher"
    if config["method"] == "dkd":
        scale = (config.get("method_args") or {}).get("scale", "auto")
        return f"dkd scale={scale}"
    return config["method"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="dkd-small-data", help="data and runs go here (kept)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from kdlab.store import Store

    work = Path(args.work)
    data = write_digits(work / "digits32")
    runs = work / "runs"
    t0 = time.perf_counter()
    grid(data, runs, args.seeds, args.workers, "kd,dkd")
    grid(data, runs, args.seeds, args.workers, "dkd", "--method-arg", "dkd.scale=1")
    wall = time.perf_counter() - t0

    store = Store(runs, readonly=True)
    rows = []
    for r in sorted(store.runs(), key=lambda r: (variant(r.config), r.config["seed"])):
        if r.status != "done":
            continue
        rows.append({"variant": variant(r.config), "seed": r.config["seed"], "run_id": r.run_id,
                     "final_acc": r.final_acc, "train_acc": [round(h["train_acc"], 1) for h in r.history],
                     "train_loss": [round(h["train_loss"], 3) for h in r.history], "health": r.health})
    store.close()
    print(f"\n{'variant':<16} {'seed':>4} {'test %':>7} {'train % (epochs 1, 5, 15)':>26}  health")
    for row in rows:
        acc = row["train_acc"]
        print(f"{row['variant']:<16} {row['seed']:>4} {row['final_acc']:7.2f} "
              f"{f'{acc[0]:.1f}, {acc[min(4, len(acc) - 1)]:.1f}, {acc[-1]:.1f}':>26}  {row['health'][:70]}")
    summary = {}
    for name in sorted({r["variant"] for r in rows}):
        accs = [r["final_acc"] for r in rows if r["variant"] == name]
        flagged = sum(r["health"] != "ok" for r in rows if r["variant"] == name)
        summary[name] = {"n": len(accs), "mean": statistics.fmean(accs),
                         "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "flagged": flagged}
        print(f"{name:<16} mean {summary[name]['mean']:.2f}% sd {summary[name]['sd']:.2f} over {len(accs)} "
              f"seeds, {flagged} flagged")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dkd_small_data-{time.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "wall_s": wall,
                                "seeds": args.seeds, "summary": summary, "runs": rows}, indent=2))
    print(f"wrote {path} ({wall:.0f}s)")


if __name__ == "__main__":
    main()

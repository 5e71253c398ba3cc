"""Data at two sizes: peak memory and time of decoding, of the loader alone and of a one-epoch run.

    python benchmarks/data_scale.py [--sizes 5000,20000] [--image-size 224] [--model vgg16 --width 0.03125]
                                    [--crop 64] [--batch 64] [--work DIR] [--out benchmarks/results]

For each size N it writes N synthetic JPEGs of image-size px (90% train, 10% test, 10 classes) into
a temporary folder, then measures, each step in a fresh process so that its peak is its own:

* decode: the folder decoded into the cache (every core, fingerprint and statistics in the same pass);
* loader: one epoch of the training loader alone, streamed from the cache (and on the "device",
  host memory here, when the split fits its budget), in images per second;
* pace: the streamed loader alone and training alone (the model's forward, backward and SGD step on
  the loader's batches), in turns in one process, so that the ratio of their rates is measured
  under one load of the machine (which, shared, varies by 2-3x from minute to minute);
* train: a one-epoch run of `kdlab train` with the residency kdlab chooses (``auto``) and with
  ``data_residency=stream`` forced, with its training rate (images / seconds of training steps).

Memory is sampled every 20 ms from /proc/self/status: ``anon_peak`` is the peak of RssAnon +
RssShmem, the process's own memory (what the issue bounds), ``rss_peak`` the peak of VmRSS, which
also counts pages of mapped files that the kernel can drop. The model trains on random-resized
crops (``--crop``) of the stored images so that an epoch of 18,000 images takes minutes on a
2-core CPU: the data path (224 px images decoded, stored, read and cropped) is the one measured.
On a GPU machine the same steps run on the GPU (the memory figures are the host's). Writes
``OUT/data-scale-<machine>-<date>.json``. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10


class PeakMemory:
    """Peak RssAnon + RssShmem and peak VmRSS of this process, sampled on a thread."""

    def __init__(self, every_s: float = 0.02):
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(every_s)

    def sample(self) -> None:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
        self.anon = max(self.anon, fields.get("RssAnon", 0) + fields.get("RssShmem", 0))
        self.rss = max(self.rss, fields.get("VmRSS", 0))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def write_jpegs(root: Path, n: int, size: int, seed: int = 0) -> float:
    """N JPEGs (quality 90) of smooth colour blobs plus noise; returns the seconds it took."""
    t0 = time.perf_counter()
    n_test = max(CLASSES, n // 10)
    jobs = [("train" if i < n - n_test else "test", i) for i in range(n)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def one(job: tuple[str, int]) -> None:
        split, i = job
        rng = np.random.default_rng(seed * 1_000_003 + i)
        label = i % CLASSES
        folder = root / split / f"class{label}"
        image = np.full((size, size, 3), 0.5, np.float32) + 0.1 * label / CLASSES
        for _ in range(3):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            image += blob[..., None] * rng.uniform(-0.5, 0.5, 3).astype(np.float32)
        image += rng.normal(0, 0.04, image.shape).astype(np.float32)
        from PIL import Image

        Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)

    for split in ("train", "test"):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, jobs, chunksize=64))
    return time.perf_counter() - t0


# ------------------------------------------------------------------- steps, each in its own process


def step_decode(folder: str) -> dict[str, Any]:
    from kdlab.data import load_dataset

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ds = load_dataset(folder)
        seconds = time.perf_counter() - t0
    n = len(ds.train) + len(ds.test)
    return {"seconds": seconds, "images_per_s": n / seconds, "images": n, "decoded_bytes": int(ds.train.images.nbytes
            + ds.test.images.nbytes), "anon_peak": mem.anon, "rss_peak": mem.rss, "fingerprint": ds.fingerprint}


def step_loader(folder: str, residency: str, batch: int, crop: int) -> dict[str, Any]:
    import torch

    from kdlab.configure import build_config
    from kdlab.data import load_dataset
    from kdlab.data.residency import make_loaders
    from kdlab.device import resolve_device

    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device("auto")
    cfg = build_config("smoke", "resnet18", overrides={"batch_size": batch, "augmentation": "random-resized-crop",
                                                      "crop_size": crop, "data_residency": residency,
                                                      "train_limit": 0, "test_limit": 0})
    with PeakMemory() as mem:
        ds = load_dataset(folder)
        t0 = time.perf_counter()
        train, _ = make_loaders(cfg, ds, device)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        seen = sum(len(b.y) for b in train.epoch(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return {"device": str(device), "residency": type(train).__name__, "images": seen, "seconds": seconds,
            "images_per_s": seen / seconds,
            "setup_s": setup, "anon_peak": mem.anon, "rss_peak": mem.rss}


def step_pace(folder: str, model: str, width: float, batch: int, crop: int, rounds: int = 6,
              per_round: int = 15) -> dict[str, Any]:
    """The streamed loader alone against training alone, in turns in one process (`rounds` x
    `per_round` batches each), so that both are measured under the same load of the machine."""
    import torch

    from kdlab.data import load_dataset
    from kdlab.data.stream import StreamLoader
    from kdlab.device import resolve_device
    from kdlab.models import create_model

    device = resolve_device("auto")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ds = load_dataset(folder)
    mean, std = ds.stats
    loader = StreamLoader(ds.train, batch, device, train=True, mean=mean, std=std, seed=0,
                          augmentation="random-resized-crop", crop_size=crop)
    net = create_model(model, width, ds.num_classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loading = training = 0.0
    images = 0
    epochs = (loader.epoch(e) for e in range(1 << 30))
    batches = next(epochs)

    def next_batch() -> Any:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # a small set: the next epoch
            batches = next(epochs)
            return next(batches)

    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        got = [next_batch() for _ in range(per_round)]
        sync()
        loading += time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in got:
            loss = torch.nn.functional.cross_entropy(net(b.x), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        training += time.perf_counter() - t0
        images += per_round * len(got[0].y)
    batches.close()
    return {"loader_images_per_s": images / loading, "training_images_per_s": images / training,
            "loader_over_training": training / loading, "images": images}


def step_train(folder: str, residency: str, model: str, width: float, batch: int, crop: int,
               runs: str) -> dict[str, Any]:
    import kdlab

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        record = kdlab.train(model, preset="smoke", runs_dir=runs, dataset=folder, width=width, epochs=1,
                             batch_size=batch, eval_batch_size=250, train_limit=0, test_limit=0, threads=0,
                             augmentation="random-resized-crop", crop_size=crop, data_residency=residency)
        seconds = time.perf_counter() - t0
    timing = record.timing or {}
    n_train = record.config["data_info"]["train"] // batch * batch
    step_s = timing.get("student_s") or float("nan")
    return {"residency": residency, "seconds": seconds, "epoch_s": record.history[0]["time_s"],
            "train_images": n_train, "training_images_per_s": n_train / step_s, "data_s": timing.get("data_s"),
            "step_s": step_s, "eval_s": timing.get("eval_s"), "test_acc": record.final_acc,
            "anon_peak": mem.anon, "rss_peak": mem.rss}


def _child(args: argparse.Namespace) -> None:
    step = {"decode": step_decode, "loader": step_loader, "pace": step_pace, "train": step_train}[args.step]
    print(json.dumps(step(*json.loads(args.child_args))))


def run_step(name: str, cache: Path, *params: Any) -> dict[str, Any]:
    env = {**os.environ, "KDLAB_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, __file__, "--step", name, "--child-args", json.dumps(params)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{proc.stderr[-3000:]}")
    notes = [line for line in proc.stderr.splitlines() if line.startswith("kdlab:")]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["notes"] = notes
    print(f"  {name} {params[1] if len(params) > 1 else ''}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k != "notes"),
          flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="5000,20000")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--width", type=float, default=0.03125)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--work", help="where the JPEGs and caches go (default: a temporary folder, removed after)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        return _child(args)
    from kdlab.device import versions
    from kdlab.progress import echo

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kdlab-data-scale-"))
    results: dict[str, Any] = {
        "environment": {"machine": _machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                        "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                        "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "load_average_before": os.getloadavg()},
        "settings": {"image_size": args.image_size, "model": args.model, "width": args.width, "crop": args.crop,
                     "batch": args.batch, "split": "90% train / 10% test, 10 classes"},
        "sizes": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        folder, cache = work / f"jpeg-{n}", work / f"cache-{n}"
        echo(f"{n:,} images: writing JPEGs into {folder}")
        written_s = write_jpegs(folder, n, args.image_size)
        row: dict[str, Any] = {"write_jpegs_s": written_s,
                               "jpeg_bytes": sum(f.stat().st_size for f in folder.rglob("*.jpg"))}
        row["decode"] = run_step("decode", cache, str(folder))
        row["loader_stream"] = run_step("loader", cache, str(folder), "stream", args.batch, args.crop)
        row["loader_auto"] = run_step("loader", cache, str(folder), "auto", args.batch, args.crop)
        row["pace"] = run_step("pace", cache, str(folder), args.model, args.width, args.batch, args.crop)
        for residency in ("auto", "stream"):
            row[f"train_{residency}"] = run_step("train", cache, str(folder), residency, args.model, args.width,
                                                 args.batch, args.crop, str(work / f"runs-{n}-{residency}"))
        results["sizes"][str(n)] = row
    results["environment"]["load_average_after"] = os.getloadavg()
    results["summary"] = _summary(results["sizes"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() else "-" for c in results["environment"]["machine"].lower()).strip("-")
    path = out / f"data-scale-{stem}-{results['environment']['date'][:10]}.json"
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))
    echo(f"wrote {path}")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _summary(sizes: dict[str, Any]) -> dict[str, Any]:
    small, large = (sizes[k] for k in sorted(sizes, key=int)[:2]) if len(sizes) > 1 else (None, None)
    out: dict[str, Any] = {}
    for n, row in sizes.items():
        out[n] = {"decode_s": row["decode"]["seconds"], "decode_img_s": row["decode"]["images_per_s"],
                  "peak_anon_gb": {k: row[k]["anon_peak"] / 1e9 for k in ("decode", "train_auto", "train_stream")},
                  "train_auto_residency": row["loader_auto"]["residency"],
                  "loader_img_s": row["loader_stream"]["images_per_s"],
                  "training_img_s": {k: row[f"train_{k}"]["training_images_per_s"] for k in ("auto", "stream")},
                  "pace": row["pace"]}
    if small is not None:
        out["large_over_small_peak_anon"] = {k: large[k]["anon_peak"] / small[k]["anon_peak"]
                                             for k in ("decode", "train_auto", "train_stream")}
    return out


def _machine() -> str:
    from kdlab.device import device_name, resolve_device

    device = resolve_device("auto")
    return device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()

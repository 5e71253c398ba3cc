"""The decoded cache: every dataset kdlab reads from files, decoded once into uint8 files that are
memory-mapped, so that a dataset of any size costs no memory until its pixels are read.

Decoding runs on every core (a thread each: Pillow releases the GIL while it decodes and resizes)
and writes each chunk straight into its place in the file, in order, while the content's
fingerprint and the pixel histogram (the normalisation statistics) are computed in the same pass:
the dataset is never held in memory, and nothing reads it twice. Layout, under the cache directory
(`default_cache_dir`, or ``--cache-dir``), one entry per source and size policy::

    <kind>-<name>-<key>/
        current.json   the complete build in use and what it holds: shapes, classes, fingerprint,
                       statistics, the kdlab cache version and the signature of the source's files
        b-<token>/     a complete build: train.u8 and test.u8 (raw N x H x W x 3), *.labels.npy
        partial/       a build under way: the same files, plan.json and progress.i8
    .locks/<entry>     held (flock) by the process that builds the entry

A complete build never changes: a rebuild gets a new folder and current.json (replaced atomically)
moves to it, so a process still reading the old one keeps valid data. progress.i8 holds one int64
per chunk, -1 until the chunk is written, then its CRC-32: an interrupted decode resumes where it
stopped, reading back (and checking) what was written to hash it again. A cache written by another
kdlab version (`STORE_VERSION`) or for files that changed since is decoded again, with a note.

Why decoded pixels rather than the compressed JPEG bytes decoded per batch (FFCV's and DALI's
answer for ImageNet-size data): pixels are read at memory speed on any machine, CPU or GPU, and
give the same batches bit for bit whatever reads them; decoding per batch needs a GPU decoder
(nvJPEG through DALI or ``torchvision.io.decode_jpeg``) to keep up and ties every epoch to it.
The price is disk: ImageNet-1k (train + val) stored at 256 px is 262 GB (200 GB at 224), refused up
front, with those numbers, where the cache's disk lacks the room.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.data.datasets import Dataset, Fingerprint, Split, atomic_write, default_cache_dir, ensure_dir, facts
from kdlab.data.decode import Decoded, conversion_note
from kdlab.data.pixels import channel_histogram, stats_from_histogram
from kdlab.errors import UserError, warn

STORE_VERSION = 1  # of this layout; bump when it changes, so older caches are decoded again, not misread
SPLITS = ("train", "test")
CHUNK_BYTES = 16 << 20  # decoded bytes per task: small enough to bound memory, large enough to amortise
SERIAL_BELOW = 256  # images: fewer are decoded in this thread (starting threads would cost more)
ANNOUNCE_FROM = 5000  # images: decodes this large say what they do and how far they are
PROGRESS_EVERY_S = 30.0
DISK_MARGIN = 256 << 20  # bytes left free on the cache's disk beyond the decoded data


@dataclass
class Plan:
    """What a source decodes into the cache (made only when the cache must be built)."""

    classes: list[str]
    labels: dict[str, np.ndarray]  # per split, int64
    shape: tuple[int, int]  # stored (height, width)
    task: Callable[[str, int, int], tuple[Callable[..., Decoded], tuple]]  # (split, start, stop) -> (fn, args)
    parallel: bool  # its tasks are worth the decoding threads (decoding files, resizing)


@dataclass
class Source:
    """A dataset's files as they are now, and how to decode them (one per kind: folder.py, cifar.py...)."""

    kind: str  # folder, cifar10, cifar100, synthetic, hf
    path: str  # where its files are: with `kind` and `image_size`, what names its cache entry
    location: str  # what a run's config records as the dataset (kdlab.data.DataIdentity.location)
    name: str  # for people
    image_size: int  # the size policy (kdlab.data.decode): 0 = the images' own size
    signature: str  # digest of the files now (kdlab.data.datasets.Signature)
    prepare: Callable[[], Plan]

    def entry_name(self) -> str:
        """The entry's folder name: readable, and unique to (kind, where, size policy)."""
        digest = hashlib.sha256(json.dumps([self.kind, self.path, self.image_size]).encode()).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)[:40]
        return f"{self.kind}-{slug}-{digest}"


def cache_root(cache_dir: Path | str | None) -> Path:
    """The cache directory: `cache_dir` when given (``--cache-dir``), else `default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def current_meta(source: Source, cache_dir: Path | str | None) -> dict[str, Any] | None:
    """The entry's current.json when it describes a complete build of these files by this kdlab version."""
    entry = cache_root(cache_dir) / source.entry_name()
    meta = _read_json(entry / "current.json")
    if meta is None or meta.get("version") != STORE_VERSION or meta.get("signature") != source.signature:
        return None
    build = entry / meta["build"]
    for split in SPLITS:
        data = build / f"{split}.u8"
        if not data.is_file() or data.stat().st_size != int(np.prod(meta["shapes"][split])):
            return None
        if not (build / f"{split}.labels.npy").is_file():
            return None
    return meta


def identity(source: Source, cache_dir: Path | str | None) -> tuple[str, dict[str, Any]] | None:
    """The fingerprint and facts of a current cache of `source` (nothing decoded), or None."""
    meta = current_meta(source, cache_dir)
    return None if meta is None else (meta["fingerprint"], meta["facts"])


def load(source: Source, cache_dir: Path | str | None, workers: int = 0) -> Dataset:
    """The dataset, memory-mapped from its cache; decoded into it first (on `workers` threads, 0:
    one per core) when there is no current one."""
    meta = current_meta(source, cache_dir) or build(source, cache_dir, workers)
    folder = cache_root(cache_dir) / source.entry_name() / meta["build"]
    splits = {}
    for split in SPLITS:
        # Copy-on-write: the arrays are writable like arrays in memory (torch.from_numpy wants that), and
        # a write stays in this process, never reaching the cache.
        images = np.memmap(folder / f"{split}.u8", dtype=np.uint8, mode="c", shape=tuple(meta["shapes"][split]))
        splits[split] = Split(images, np.load(folder / f"{split}.labels.npy"))
    stats = meta["stats"]["mean"], meta["stats"]["std"]
    return Dataset(source.name, splits["train"], splits["test"], list(meta["classes"]), meta["fingerprint"],
                   known_stats=stats, cache_path=str(folder))


def build(source: Source, cache_dir: Path | str | None, workers: int = 0) -> dict[str, Any]:
    """Decode `source` into its cache entry (resuming a build left unfinished) and return its meta."""
    root = cache_root(cache_dir)
    entry = root / source.entry_name()
    remedy = "pass --cache-dir (or set KDLAB_CACHE_DIR) to a writable folder"
    ensure_dir(root / ".locks", "the decoded cache folder", remedy)
    with _locked(root / ".locks" / entry.name, source):
        meta = current_meta(source, cache_dir)  # another process may have built it while we waited
        if meta is not None:
            return meta
        old = _read_json(entry / "current.json")
        if old is not None:
            why = ("was written by another kdlab version" if old.get("version") != STORE_VERSION else
                   "is out of date: files changed since it was decoded" if old.get("signature") != source.signature
                   else "is damaged")
            warn(f"the decoded cache of {source.name} {why}; decoding it again")
        ensure_dir(entry, "the decoded cache folder", remedy)
        try:
            return _Build(source, source.prepare(), entry, workers or os.cpu_count() or 1).run()
        except UserError:
            # The files must change before this can succeed, and then nothing of it could be reused.
            shutil.rmtree(entry / "partial", ignore_errors=True)
            if not (entry / "current.json").exists():
                shutil.rmtree(entry, ignore_errors=True)
            raise


class _Build:
    """One build of a cache entry: the chunks of both splits decoded in order into `partial/`."""

    def __init__(self, source: Source, plan: Plan, entry: Path, workers: int):
        self.source, self.plan, self.entry, self.workers = source, plan, entry, workers
        self.partial = entry / "partial"
        h, w = plan.shape
        self.shapes = {s: (len(plan.labels[s]), h, w, 3) for s in SPLITS}
        self.row = h * w * 3
        per_chunk = max(1, CHUNK_BYTES // self.row)
        self.chunks = [(s, a, min(a + per_chunk, self.shapes[s][0]))
                       for s in SPLITS for a in range(0, self.shapes[s][0], per_chunk)]
        self.plan_json = {"version": STORE_VERSION, "signature": source.signature,
                          "shapes": {s: list(v) for s, v in self.shapes.items()}, "classes": plan.classes,
                          "per_chunk": per_chunk,
                          "labels": [zlib.crc32(np.ascontiguousarray(plan.labels[s]).data) for s in SPLITS]}

    def run(self) -> dict[str, Any]:
        progress = self._open_partial()
        total = sum(v[0] for v in self.shapes.values())
        done_before = sum(b - a for (_, a, b), crc in zip(self.chunks, progress, strict=True) if crc >= 0)
        parallel = self.plan.parallel and self.workers > 1 and total - done_before >= SERIAL_BELOW
        workers = self.workers if parallel else 1
        if total >= ANNOUNCE_FROM or done_before:
            resumed = f", resuming after {done_before:,} already decoded" if done_before else ""
            warn_line(f"decoding {total:,} images of {self.source.name} into {self.partial.parent} "
                      f"({workers} thread{'s' * (workers > 1)}{resumed})")
        t0 = time.perf_counter()
        fingerprint, histogram = Fingerprint(), np.zeros((3, 256), dtype=np.int64)
        converted: Counter = Counter()
        examples: dict[str, str] = {}
        fds = {s: os.open(self.partial / f"{s}.u8", os.O_RDWR) for s in SPLITS}
        progress_fd = os.open(self.partial / "progress.i8", os.O_RDWR)
        try:
            results = self._results(progress, fds, workers)
            last_report, written = time.perf_counter(), 0
            for split in SPLITS:
                fingerprint.header(np.uint8, self.shapes[split])
                for c, (s, a, b) in enumerate(self.chunks):
                    if s != split:
                        continue
                    decoded, fresh = next(results)
                    data = np.ascontiguousarray(decoded.images).data.cast("B")
                    if fresh:
                        _pwrite(fds[split], data, a * self.row)
                        os.pwrite(progress_fd, np.int64(zlib.crc32(data)).tobytes(), 8 * c)
                    fingerprint.update(data)
                    if split == "train":
                        histogram += decoded.histogram
                    converted.update(decoded.converted)
                    for mode, name in decoded.examples.items():
                        examples.setdefault(mode, name)
                    written += b - a
                    if total >= ANNOUNCE_FROM and time.perf_counter() - last_report > PROGRESS_EVERY_S:
                        last_report = time.perf_counter()
                        warn_line(f"decoded {written:,} of {total:,} images of {self.source.name}")
                fingerprint.array(self.plan.labels[split])
            digest = fingerprint.classes(self.plan.classes)
        finally:
            for fd in (*fds.values(), progress_fd):
                os.close(fd)
        note = conversion_note(converted, examples)
        if note:
            warn(f"{self.source.name}: {note}")
        return self._finish(digest, histogram, time.perf_counter() - t0, dict(converted))

    def _open_partial(self) -> np.ndarray:
        """The progress of a build of the same plan left in partial/, or a fresh partial/ (disk space checked)."""
        if _read_json(self.partial / "plan.json") == self.plan_json:
            progress = np.fromfile(self.partial / "progress.i8", dtype=np.int64)
            if len(progress) == len(self.chunks):
                return progress
        shutil.rmtree(self.partial, ignore_errors=True)
        needed = sum(int(np.prod(v)) for v in self.shapes.values())
        free = shutil.disk_usage(self.entry).free
        if free < needed + DISK_MARGIN:
            h, w = self.plan.shape
            raise UserError(f"decoding {self.source.name} ({sum(v[0] for v in self.shapes.values()):,} images at "
                            f"{w}x{h}) needs {needed / 1e9:.1f} GB in {self.entry.parent}, which has "
                            f"{free / 1e9:.1f} GB free: pass --cache-dir on a larger disk, or store smaller images "
                            "with --set image_size=S")
        self.partial.mkdir()
        for split in SPLITS:
            with open(self.partial / f"{split}.u8", "wb") as f:
                f.truncate(int(np.prod(self.shapes[split])))  # sparse: blocks are allocated as chunks land
            np.save(self.partial / f"{split}.labels.npy", self.plan.labels[split])
        progress = np.full(len(self.chunks), -1, dtype=np.int64)
        progress.tofile(self.partial / "progress.i8")
        (self.partial / "plan.json").write_text(json.dumps(self.plan_json))
        return progress

    def _results(self, progress: np.ndarray, fds: dict[str, int], workers: int) -> Iterator[tuple[Decoded, bool]]:
        """Each chunk's images in order, and whether they were decoded now (else read back, checked)."""
        pool = ThreadPoolExecutor(workers, thread_name_prefix="kdlab-decode") if workers > 1 else None
        pending: deque[tuple[int, Future | None]] = deque()
        ahead = 2 * workers

        def start(c: int) -> Future | None:
            if progress[c] >= 0 or pool is None:
                return None
            fn, args = self.plan.task(*self.chunks[c])
            return pool.submit(fn, *args)

        try:
            queued = 0
            for _ in self.chunks:
                while queued < len(self.chunks) and len(pending) < ahead:
                    pending.append((queued, start(queued)))
                    queued += 1
                c, future = pending.popleft()
                if future is not None:
                    yield future.result(), True
                    continue
                old = self._read_back(c, progress[c], fds)
                if old is not None:
                    yield old, False
                    continue
                fn, args = self.plan.task(*self.chunks[c])
                yield fn(*args), True
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _read_back(self, c: int, crc: int, fds: dict[str, int]) -> Decoded | None:
        """A chunk written before an interruption, if its bytes are still what was written."""
        if crc < 0:
            return None
        split, a, b = self.chunks[c]
        data = os.pread(fds[split], (b - a) * self.row, a * self.row)
        if len(data) != (b - a) * self.row or zlib.crc32(data) != crc:
            return None  # lost (a crash before the page cache reached the disk): decode it again
        images = np.frombuffer(data, dtype=np.uint8).reshape(b - a, *self.shapes[split][1:])
        return Decoded(images, channel_histogram(images) if split == "train" else np.zeros((3, 256), np.int64))

    def _finish(self, fingerprint: str, histogram: np.ndarray, seconds: float,
                converted: dict[str, int]) -> dict[str, Any]:
        """Move partial/ to its own build folder and point current.json at it; drop older builds."""
        mean, std = stats_from_histogram(histogram)
        n_train, h, w, _ = self.shapes["train"]
        build = f"b-{secrets.token_hex(4)}"
        meta = {"version": STORE_VERSION, "signature": self.source.signature, "kind": self.source.kind,
                "path": self.source.path, "name": self.source.name, "image_size": self.source.image_size,
                "build": build, "shapes": self.plan_json["shapes"], "classes": self.plan.classes,
                "fingerprint": fingerprint, "facts": facts((h, w), len(self.plan.classes), n_train,
                                                           self.shapes["test"][0]),
                "stats": {"mean": mean, "std": std}, "converted": converted, "decode_s": round(seconds, 3),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (self.partial / "plan.json").unlink()
        (self.partial / "progress.i8").unlink()
        os.rename(self.partial, self.entry / build)
        with atomic_write(self.entry / "current.json") as f:
            f.write(json.dumps(meta, indent=1).encode())
        for old in self.entry.glob("b-*"):
            if old.name != build:
                shutil.rmtree(old, ignore_errors=True)  # a reader's open maps of it stay valid
        return meta


def warn_line(message: str) -> None:
    """A line about the cache's work on stderr (not a warning: nothing is wrong)."""
    from kdlab.progress import echo

    echo(f"kdlab: {message}")


@contextmanager
def _locked(path: Path, source: Source) -> Iterator[None]:
    """Hold the entry's build lock: one process decodes, the others wait and then use its result."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warn_line(f"waiting for another kdlab process decoding {source.name}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written

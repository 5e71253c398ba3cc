"""Tests of the dataset layer: CIFAR reading, download, cache, the synthetic set and image folders."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab.data import Dataset, cifar, default_data_dir, folder, load_dataset, write_synthetic_cifar
from kdlab.errors import UserError

REPO = Path(__file__).resolve().parents[1]
JPEG_COPY = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"


# --------------------------------------------------------------------------------- fake CIFAR files


def _images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images as the official rows: R plane, then G, then B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def _dump(path: Path, obj: object, bytes_keys: bool = True) -> None:
    if bytes_keys:
        obj = {k.encode(): v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=2 if bytes_keys else 4))


def write_fake_cifar(data_dir: Path, key: str = "cifar10", n: int = 6, seed: int = 0,
                     bytes_keys: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a tiny copy of the official layout of ``key``; return train/test images and labels."""
    layout = cifar.LAYOUTS[key]
    num_classes = 10 if key == "cifar10" else 100
    rng = np.random.default_rng(seed)
    root = data_dir / layout.folder
    root.mkdir(parents=True, exist_ok=True)
    names = [f"name{i}" for i in range(num_classes)]
    _dump(root / layout.meta_file, {layout.names_key: names}, bytes_keys)
    parts = []
    for file_name in [*layout.train_files, layout.test_file]:
        images, labels = _images(rng, n), rng.integers(0, num_classes, n)
        _dump(root / file_name, {"data": _rows(images), layout.label_key: [int(y) for y in labels]}, bytes_keys)
        parts.append((images, labels))
    train = parts[:-1]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *parts[-1])


def make_archive(tmp: Path, key: str = "cifar10") -> tuple[Path, str, tuple]:
    """A fake official archive in ``tmp/served``: its path, MD5 and the arrays it holds."""
    src = tmp / "src"
    arrays = write_fake_cifar(src, key)
    served = tmp / "served"
    served.mkdir()
    archive = served / cifar.LAYOUTS[key].archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / cifar.LAYOUTS[key].folder, arcname=cifar.LAYOUTS[key].folder)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), arrays


def check_loaded(ds: Dataset, arrays: tuple) -> None:
    train_x, train_y, test_x, test_y = arrays
    assert np.array_equal(ds.train.images, train_x) and np.array_equal(ds.train.labels, train_y)
    assert np.array_equal(ds.test.images, test_x) and np.array_equal(ds.test.labels, test_y)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    assert ds.train.images.flags.c_contiguous and ds.test.images.flags.c_contiguous


@pytest.fixture
def http_url() -> Iterator[Callable[[Path], str]]:
    """Serve a folder on 127.0.0.1 from a thread; yields a function folder -> base URL."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def serve(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_reads_official_layout_pixels_in_hwc(tmp_path: Path, bytes_keys: bool) -> None:
    arrays = write_fake_cifar(tmp_path, bytes_keys=bytes_keys)
    ds = load_dataset("cifar10", tmp_path, download=False)
    check_loaded(ds, arrays)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.classes[3] == "name3"


def test_reads_cifar100_layout(tmp_path: Path) -> None:
    arrays = write_fake_cifar(tmp_path, "cifar100")
    ds = load_dataset("cifar100", tmp_path, download=False)
    check_loaded(ds, arrays)
    assert ds.num_classes == 100


def test_missing_without_download_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar-10-batches-py") as err:
        load_dataset("cifar10", tmp_path / "data", download=False)
    assert str(tmp_path / "data") in str(err.value)
    assert not (tmp_path / "data").exists()


def test_missing_batch_file_is_named(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path)  # even with download allowed: never overwrite a user's folder


def test_truncated_batch_file_is_named(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(UserError, match="data_batch_2 is damaged"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("entry, message", [
    ({"data": np.zeros((4, 3000), np.uint8), "labels": [0, 1, 2, 3]}, "shape"),
    ({"data": np.zeros((4, 3072), np.float32), "labels": [0, 1, 2, 3]}, "uint8"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, "4 integers"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, "0..9"),
    ({"labels": [0]}, "lacks"),
])
def test_bad_batch_contents_are_user_errors(tmp_path: Path, entry: dict, message: str) -> None:
    write_fake_cifar(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", entry)
    with pytest.raises(UserError, match=message):
        load_dataset("cifar10", tmp_path, download=False)


def test_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="unexpected object"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- cache


def _entry(cache_dir: Path) -> Path:
    """The one entry of a decoded cache (tests that decode one dataset into a cache of their own)."""
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    return entry


def test_cache_is_used_then_rebuilt_when_a_source_changes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    arrays = write_fake_cifar(tmp_path)
    load_dataset("cifar10", tmp_path, download=False)
    # The cache lives in the cache dir, never beside the user's files.
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == sorted(
        cifar.LAYOUTS["cifar10"].file_names())
    assert (_entry(tmp_path / "cache") / "current.json").is_file()

    def no_parse(*args: object) -> None:
        raise AssertionError("parsed the pickles although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(cifar, "_read_layout", no_parse)
        check_loaded(load_dataset("cifar10", tmp_path, download=False), arrays)

    new_arrays = write_fake_cifar(tmp_path, seed=1)  # rewrites every file: new sizes or mtimes
    check_loaded(load_dataset("cifar10", tmp_path, download=False), new_arrays)


def test_unreadable_cache_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    arrays = write_fake_cifar(tmp_path)
    load_dataset("cifar10", tmp_path, download=False)
    (data,) = _entry(tmp_path / "cache").glob("b-*/train.u8")
    data.write_bytes(data.read_bytes()[:1000])  # truncated
    check_loaded(load_dataset("cifar10", tmp_path, download=False), arrays)
    (_entry(tmp_path / "cache") / "current.json").write_text("{not json")
    check_loaded(load_dataset("cifar10", tmp_path, download=False), arrays)


# ---------------------------------------------------------------------------------------- download


def test_download_from_file_url(tmp_path: Path, monkeypatch) -> None:
    archive, md5, arrays = make_archive(tmp_path)
    monkeypatch.setitem(cifar.SOURCES, "cifar10", cifar.Source(archive.as_uri(), md5))
    data_dir = tmp_path / "data"
    check_loaded(load_dataset("cifar10", data_dir), arrays)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


@pytest.mark.parametrize("key", ["cifar10", "cifar100"])
def test_download_over_http(tmp_path: Path, monkeypatch, http_url, key: str) -> None:
    archive, md5, arrays = make_archive(tmp_path, key)
    url = f"{http_url(archive.parent)}/{archive.name}"
    monkeypatch.setitem(cifar.SOURCES, key, cifar.Source(url, md5))
    check_loaded(load_dataset(key, tmp_path / "data"), arrays)


def test_checksum_mismatch_leaves_nothing_behind(tmp_path: Path, monkeypatch, http_url) -> None:
    archive, md5, _ = make_archive(tmp_path)
    url = f"{http_url(archive.parent)}/{archive.name}"
    monkeypatch.setitem(cifar.SOURCES, "cifar10", cifar.Source(url, "0" * 32))
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match="checksum mismatch") as err:
        load_dataset("cifar10", data_dir)
    assert "0" * 32 in str(err.value) and md5 in str(err.value)
    assert list(data_dir.iterdir()) == []


def test_damaged_archive_already_present_is_refused(tmp_path: Path, monkeypatch) -> None:
    archive, md5, _ = make_archive(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / archive.name).write_bytes(archive.read_bytes()[:-10])
    monkeypatch.setitem(cifar.SOURCES, "cifar10", cifar.Source("http://127.0.0.1:1/unused", md5))
    with pytest.raises(UserError, match="delete it"):
        load_dataset("cifar10", data_dir)
    assert not (data_dir / "cifar-10-batches-py").exists()


def test_unreachable_server_says_where_to_put_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(cifar.SOURCES, "cifar10", cifar.Source("http://127.0.0.1:1/cifar.tar.gz", "0" * 32))
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match="could not download CIFAR-10") as err:
        load_dataset("cifar10", data_dir)
    assert str(data_dir / "cifar-10-batches-py") in str(err.value)
    assert "\n" not in str(err.value)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("bad", ["../escape", "/abs/escape", "link"])
def test_unsafe_archive_members_are_refused(tmp_path: Path, monkeypatch, bad: str) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(bad if bad != "link" else "cifar-10-batches-py/data_batch_1")
        if bad == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.SOURCES, "cifar10", cifar.Source(archive.as_uri(), md5))
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match="refusing to extract"):
        load_dataset("cifar10", data_dir)
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_round_trip_through_official_layout(tmp_path: Path) -> None:
    folder_path = write_synthetic_cifar(tmp_path, n_train=100, n_test=30, num_classes=4, seed=1)
    assert folder_path == tmp_path / "cifar-10-batches-py"
    assert sorted(p.name for p in folder_path.iterdir()) == sorted(cifar.LAYOUTS["cifar10"].file_names())
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.classes == ["class0", "class1", "class2", "class3"]
    assert ds.train.images.shape == (100, 32, 32, 3) and ds.test.images.shape == (30, 32, 32, 3)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    assert np.bincount(ds.train.labels).tolist() == [25] * 4
    assert np.bincount(ds.test.labels).tolist() == [8, 8, 7, 7]
    assert 40 < ds.train.images.mean() < 215 and ds.train.images.std() > 20  # not blank, not saturated


def test_synthetic_is_deterministic_by_seed(tmp_path: Path) -> None:
    def load(seed: int, where: str) -> Dataset:
        write_synthetic_cifar(tmp_path / where, n_train=50, n_test=10, seed=seed, image_size=16)
        return load_dataset("cifar10", tmp_path / where, download=False)

    a, b, c = load(3, "a"), load(3, "b"), load(4, "c")
    assert a.train.images.shape == (50, 16, 16, 3)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)


def test_synthetic_classes_are_separable_by_prototype(tmp_path: Path) -> None:
    """Cheap learnability check: nearest class mean beats chance clearly but is far from perfect."""
    write_synthetic_cifar(tmp_path, n_train=2000, n_test=500)
    ds = load_dataset("cifar10", tmp_path, download=False)
    x = ds.train.images.reshape(len(ds.train), -1).astype(np.float32)
    means = np.stack([x[ds.train.labels == c].mean(0) for c in range(10)])
    xt = ds.test.images.reshape(len(ds.test), -1).astype(np.float32)
    dist = ((xt[:, None, :] - means[None]) ** 2).sum(-1)
    acc = (dist.argmin(1) == ds.test.labels).mean()
    assert 0.2 < acc < 0.9


def test_load_synthetic_generates_once_and_reads_back(tmp_path: Path) -> None:
    start = time.perf_counter()
    ds = load_dataset("synthetic", tmp_path)
    assert time.perf_counter() - start < 10
    assert ds.name == "synthetic" and len(ds.train) == 2000 and len(ds.test) == 500 and ds.num_classes == 10
    batch = tmp_path / "synthetic" / "cifar-10-batches-py" / "data_batch_1"
    stamp = batch.stat().st_mtime_ns
    again = load_dataset("synthetic", tmp_path)
    assert batch.stat().st_mtime_ns == stamp  # not regenerated
    assert np.array_equal(again.train.images, ds.train.images)


# ----------------------------------------------------------------------------------- image folders


def write_folder(root: Path, classes: dict[str, int], suffix: str = ".png", size: tuple[int, int] = (24, 20),
                 splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> dict[str, np.ndarray]:
    """``classes`` maps class name -> images per split; returns the written pixels per split (PNG only)."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for split in splits:
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img{i:03d}{suffix}")
                written.setdefault(split, []).append(pixels)
    return {split: np.stack(images) for split, images in written.items()}


def test_png_folder_keeps_native_size_and_pixels(tmp_path: Path) -> None:
    pixels = write_folder(tmp_path / "pets", {"dog": 3, "cat": 2})
    ds = load_dataset(str(tmp_path / "pets"))
    assert ds.name == "pets" and ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (5, 20, 24, 3)
    # Written dog first, cat second; read back in sorted class order.
    assert np.array_equal(ds.train.images, np.concatenate([pixels["train"][3:], pixels["train"][:3]]))
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 1]


def test_jpeg_and_grayscale_folder(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 2, "b": 2}, suffix=".jpg")
    Image.new("L", (24, 20), 128).save(tmp_path / "test" / "b" / "gray.JPEG")
    ds = load_dataset(str(tmp_path))
    assert ds.train.images.shape == (4, 20, 24, 3) and ds.test.images.shape == (5, 20, 24, 3)
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 1]


def test_folder_class_mismatch(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 1, "b": 1})
    write_folder(tmp_path, {"c": 1}, splits=("test",))
    with pytest.raises(UserError, match="only in test/: c"):
        load_dataset(str(tmp_path))


def test_folder_mixed_sizes_names_the_file(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 2, "b": 2})
    Image.new("RGB", (32, 32)).save(tmp_path / "test" / "b" / "odd.png")
    with pytest.raises(UserError, match=r"one size: .*odd\.png is 32x32"):
        load_dataset(str(tmp_path))


def _no_split_folders(root: Path) -> None:
    pass


def _no_classes(root: Path) -> None:
    (root / "train").mkdir()
    (root / "test").mkdir()


def _no_test(root: Path) -> None:
    write_folder(root, {"a": 1}, splits=("train",))


def _junk_image(root: Path) -> None:
    write_folder(root, {"a": 1})
    (root / "train" / "a" / "img000.png").write_bytes(b"junk")


def _empty_test(root: Path) -> None:
    write_folder(root, {"a": 1}, splits=("train",))
    (root / "test" / "a").mkdir(parents=True)


@pytest.mark.parametrize("setup, message", [
    (_no_split_folders, "no train/ folder"),
    (_no_classes, "no class subfolders"),
    (_no_test, r"no test/ \(or val/\) folder"),
    (_junk_image, r"cannot read the image .*img000\.png"),
    (_empty_test, r"test/a holds no PNG or JPEG images; every class needs images in both splits"),
])
def test_folder_problems_are_user_errors(tmp_path: Path, setup: Callable[[Path], None], message: str) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    setup(root)
    with pytest.raises(UserError, match=message):
        load_dataset(str(root))


def test_folder_cache_reused_and_invalidated(tmp_path: Path, monkeypatch) -> None:
    write_folder(tmp_path, {"a": 2, "b": 2})
    before = sorted(tmp_path.rglob("*"))
    first = load_dataset(str(tmp_path))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written into the user's folder
    with monkeypatch.context() as patch:
        patch.setattr(folder, "decode_images", lambda *args: pytest.fail("decoded although cached"))
        assert np.array_equal(load_dataset(str(tmp_path)).train.images, first.train.images)
    Image.new("RGB", (24, 20), "red").save(tmp_path / "train" / "b" / "new.png")
    again = load_dataset(str(tmp_path))
    assert len(again.train) == 5 and again.train.images[-1, 0, 0].tolist() == [255, 0, 0]


# ------------------------------------------------------------------------------------ names, paths


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UserError, match="cifar10, cifar100, synthetic"):
        load_dataset("imagenet")


def test_missing_folder_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"))


def test_default_data_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDLAB_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("KDLAB_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "kdlab" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == Path.home() / ".cache" / "kdlab" / "data"


@pytest.mark.skipif(not JPEG_COPY.is_dir(), reason="no shared JPEG copy of CIFAR-10 beside the repo")
def test_jpeg_copy_of_cifar10(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(JPEG_COPY / "make_cifar10_batches.py"), str(tmp_path)],
                   check=True, capture_output=True)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert len(ds.train) == 50000 and len(ds.test) == 10000
    assert ds.classes[0] == "airplane" and np.bincount(ds.train.labels).tolist() == [5000] * 10


def test_synthetic_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="n_train >= 5"):
        write_synthetic_cifar(tmp_path, n_train=2)

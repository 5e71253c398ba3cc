"""The decoded cache: parallel = serial byte for byte, fingerprints as before, resume, staleness, size
policy, ImageNet's layout, bad data in one line at any size. Small images, a few hundred at most."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab.data import cache, default_cache_dir, identify_dataset, load_dataset
from kdlab.data.datasets import fingerprint_arrays
from kdlab.data.decode import fit
from kdlab.data.pixels import channel_stats
from kdlab.errors import UserError

# What today's kdlab (before the decoded cache) fingerprinted these datasets as: runs keep their ids.
DIGITS_FINGERPRINT = "bbdd2abae46363c7"  # the image_folder fixture's default folder
SYNTHETIC_FINGERPRINT = "e7cb10de62d65bd9"  # the default synthetic set


def jpeg_folder(root: Path, classes: int = 3, per_class: int = 100, size: tuple[int, int] = (12, 10),
                test: str = "test", seed: int = 0) -> Path:
    """Noisy JPEGs, `per_class` per class in train and a third of that in the test split."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), (test, max(1, per_class // 3))):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _entry(cache_dir: Path) -> Path:
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    return entry


def _build(cache_dir: Path) -> Path:
    (build,) = _entry(cache_dir).glob("b-*")
    return build


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few images and threads from the first image, so that small sets decode in parallel."""
    monkeypatch.setattr(cache, "CHUNK_BYTES", 8 * 12 * 10 * 3)
    monkeypatch.setattr(cache, "SERIAL_BELOW", 0)


def test_parallel_decode_is_serial_decode_byte_for_byte(tmp_path, small_chunks):
    root = jpeg_folder(tmp_path / "jpegs")
    source = lambda: cache_source(root)  # noqa: E731
    serial = cache.load(source(), tmp_path / "serial", workers=1)
    parallel = cache.load(source(), tmp_path / "parallel", workers=2)
    for split in ("train", "test"):
        a = (_build(tmp_path / "serial") / f"{split}.u8").read_bytes()
        assert a == (_build(tmp_path / "parallel") / f"{split}.u8").read_bytes()
    assert serial.fingerprint == parallel.fingerprint and serial.stats == parallel.stats
    # ... and both are what decoding every file whole gives: the fingerprint and statistics of the arrays.
    assert serial.fingerprint == fingerprint_arrays(serial.train, serial.test, serial.classes)
    mean, std = channel_stats(np.asarray(serial.train.images))
    assert np.allclose(serial.stats[0], mean, atol=1e-12) and np.allclose(serial.stats[1], std, atol=1e-12)
    first = np.asarray(Image.open(root / "train" / "c0" / "0000.jpg").convert("RGB"))
    assert np.array_equal(serial.train.images[0], first)


def cache_source(root: Path, image_size: int = 0):
    from kdlab.data import folder

    return folder.source(root, image_size)


def test_fingerprints_are_those_of_before_the_cache(image_folder, synthetic_dir):
    assert identify_dataset(str(image_folder())).fingerprint == DIGITS_FINGERPRINT
    assert load_dataset("synthetic", synthetic_dir).fingerprint == SYNTHETIC_FINGERPRINT


def test_an_interrupted_decode_resumes_and_ends_as_an_uninterrupted_one(tmp_path, small_chunks, monkeypatch):
    root = jpeg_folder(tmp_path / "jpegs", per_class=40)
    whole = cache.load(cache_source(root), tmp_path / "whole", workers=2)
    calls = {"n": 0}
    real = cache.Plan

    def counting_plan(*args, **kwargs):
        plan = real(*args, **kwargs)
        task = plan.task

        def counted(split, start, stop):
            calls["n"] += 1
            if calls["n"] == 6 and stop_early["on"]:
                raise KeyboardInterrupt
            return task(split, start, stop)

        plan.task = counted
        return plan

    stop_early = {"on": True}
    monkeypatch.setattr("kdlab.data.folder.Plan", counting_plan)
    with pytest.raises(KeyboardInterrupt):
        cache.load(cache_source(root), tmp_path / "cut", workers=1)
    partial = _entry(tmp_path / "cut") / "partial"
    progress = np.fromfile(partial / "progress.i8", dtype=np.int64)
    assert 0 < (progress >= 0).sum() < len(progress)
    # A chunk whose bytes were lost (a crash before they reached the disk) is decoded again.
    with open(partial / "train.u8", "r+b") as f:
        f.write(b"\0" * 16)
    stop_early["on"], calls["n"] = False, 0
    resumed = cache.load(cache_source(root), tmp_path / "cut", workers=1)
    assert calls["n"] == len(progress) - (progress >= 0).sum() + 1  # the rest, and the damaged first chunk
    assert resumed.fingerprint == whole.fingerprint and resumed.stats == whole.stats
    assert np.array_equal(resumed.train.images, whole.train.images)
    assert not partial.exists()


def test_stale_caches_are_decoded_again_with_a_note(tmp_path, capsys):
    root = jpeg_folder(tmp_path / "jpegs", per_class=3)
    first = load_dataset(str(root))
    entry = default_cache_dir() / cache_source(root).entry_name()
    meta = json.loads((entry / "current.json").read_text())
    meta["version"] = cache.STORE_VERSION + 1  # as another kdlab version would have written it
    (entry / "current.json").write_text(json.dumps(meta))
    assert load_dataset(str(root)).fingerprint == first.fingerprint
    assert "written by another kdlab version; decoding it again" in capsys.readouterr().err
    Image.new("RGB", (12, 10), "red").save(root / "train" / "c1" / "new.jpg")
    changed = load_dataset(str(root))
    assert "files changed since it was decoded" in capsys.readouterr().err
    assert len(changed.train) == len(first.train) + 1 and changed.fingerprint != first.fingerprint
    assert len(list(entry.glob("b-*"))) == 1  # the older build is gone


def test_a_read_only_folder_is_decoded_once(tmp_path, image_folder, monkeypatch):
    root = image_folder("ro", where=tmp_path)
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)
    try:
        first = load_dataset(str(root))
        monkeypatch.setattr(cache, "build", lambda *a, **k: pytest.fail("decoded again"))
        assert np.array_equal(load_dataset(str(root)).train.images, first.train.images)
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755)


def test_cache_dir_setting_and_variable(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("KDLAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kdlab" / "decoded"
    root = image_folder(where=tmp_path)
    load_dataset(str(root), cache_dir=tmp_path / "given")
    assert (_entry(tmp_path / "given") / "current.json").is_file()
    assert not (tmp_path / "xdg").exists()


def test_not_enough_disk_is_one_line_and_leaves_nothing(tmp_path, image_folder, monkeypatch):
    root = image_folder(where=tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 20})())
    with pytest.raises(UserError, match=r"needs 0\.0 GB in .*, which has 0\.0 GB free: pass --cache-dir") as err:
        load_dataset(str(root), cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [".locks"]


def test_mixed_sizes_with_a_size_policy_and_imagenet_layout(tmp_path):
    import torchvision.transforms.functional as TF

    root = tmp_path / "shop"
    rng = np.random.default_rng(0)
    sizes = [(20, 14), (14, 20), (16, 16), (31, 9)]
    for split in ("train", "val"):  # ImageNet's name for the test split
        for c in ("bag", "hat"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    with pytest.raises(UserError, match=r"one size: .* pass --set image_size=S"):
        load_dataset(str(root))
    ds = load_dataset(str(root), image_size=12)
    assert ds.train.images.shape == (8, 12, 12, 3) and ds.test.images.shape == (8, 12, 12, 3)
    # The policy is torchvision's Resize(12) + CenterCrop(12), to the pixel.
    for i in range(len(sizes)):
        image = Image.open(root / "train" / "bag" / f"{i}.png")
        expected = np.asarray(TF.center_crop(TF.resize(image, 12), 12))
        assert np.array_equal(ds.train.images[i], expected)
        assert np.array_equal(np.asarray(fit(image, 12)), expected)
    assert identify_dataset(str(root), image_size=12).info["image_size"] == [12, 12]


@pytest.mark.parametrize("bad", ["corrupt", "empty-test-class", "only-in-test"])
def test_bad_data_is_one_line_at_any_size(tmp_path, small_chunks, bad):
    root = jpeg_folder(tmp_path / "jpegs", per_class=60)
    if bad == "corrupt":
        (root / "train" / "c2" / "0031.jpg").write_bytes(b"not a jpeg")
        message = r"cannot read the image .*train/c2/0031\.jpg"
    elif bad == "empty-test-class":
        for path in (root / "test" / "c1").iterdir():
            path.unlink()
        message = r"test/c1 holds no PNG or JPEG images"
    else:
        (root / "test" / "c9").mkdir()
        message = r"only in train/: -; only in test/: c9"
    with pytest.raises(UserError, match=message):
        cache.load(cache_source(root), tmp_path / "c", workers=2)
    assert not (tmp_path / "c").exists() or [p.name for p in (tmp_path / "c").iterdir()] == [".locks"]
    if bad != "corrupt":
        return
    # The command says it in one line, exit 2, and writes no run.
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", "train", "resnet18", "--preset", "smoke", "--dataset",
                           str(root), "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KDLAB_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("kdlab: error: ")
    assert not (tmp_path / "runs").exists()


def test_grayscale_cmyk_and_rgba_are_converted_with_one_note(tmp_path, capsys):
    root = jpeg_folder(tmp_path / "jpegs", classes=2, per_class=3)
    Image.new("L", (12, 10), 77).save(root / "train" / "c0" / "gray.png")
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(root / "train" / "c1" / "cmyk.jpg")
    Image.new("RGBA", (12, 10), (10, 20, 30, 0)).save(root / "test" / "c1" / "alpha.png")
    ds = load_dataset(str(root))
    err = capsys.readouterr().err
    assert err.count("converted images to RGB") == 1
    assert "1 grayscale" in err and "1 CMYK" in err and "1 RGBA (alpha dropped)" in err
    gray = ds.train.images[3]  # c0: 0000-0002.jpg, then gray.png
    assert (gray == 77).all()
    assert np.array_equal(ds.test.images[-1][0, 0], [10, 20, 30])

"""Both residencies (the split on the device, or streamed from the cache) give the same batches; the
choice is made for the user and printed once; random-resized-crop and centre crops; the ImageNet preset."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdlab
from kdlab.configure import build_config
from kdlab.data import load_dataset, residency
from kdlab.data.augment import batch_generator, centre_crop, resized_crop, resized_crop_boxes
from kdlab.data.loader import DeviceLoader
from kdlab.data.stream import StreamLoader
from kdlab.errors import UserError

CPU = torch.device("cpu")


def _batches(loader, epoch):
    return [(b.x, b.y, b.index, b.view, b.mask) for b in loader.epoch(epoch)]


@pytest.mark.parametrize("augmentation, crop_size", [("pad-crop", 0), ("random-resized-crop", 24),
                                                     ("random-resized-crop", 0)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_same_seed_same_batches_in_both_residencies(synthetic_dir, augmentation, crop_size, train, shard):
    ds = load_dataset("synthetic", synthetic_dir)
    options = dict(train=train, mean=[0.5] * 3, std=[0.25] * 3, seed=3, limit=200, augmentation=augmentation,
                   crop_size=crop_size, shard=shard, channels_last=train)
    device, stream = DeviceLoader(ds.train, 64, CPU, **options), StreamLoader(ds.train, 64, CPU, **options)
    assert len(device) == len(stream) and device.batch_size == stream.batch_size and device.n == stream.n
    for epoch in (0, 1):
        for a, b in zip(_batches(device, epoch), _batches(stream, epoch), strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y) and x.stride() == y.stride()
    first = next(stream.epoch(0))  # an abandoned epoch stops its threads (the engine's _blank does this)
    assert first.x.shape[-2:] == ((crop_size, crop_size) if crop_size else (32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: pinned buffers, asynchronous copies")
@pytest.mark.parametrize("augmentation, crop_size", [("pad-crop", 0), ("random-resized-crop", 24)])
def test_same_batches_in_both_residencies_on_a_gpu(synthetic_dir, augmentation, crop_size):
    ds = load_dataset("synthetic", synthetic_dir)
    cuda = torch.device("cuda")
    for train in (True, False):
        options = dict(train=train, mean=[0.5] * 3, std=[0.25] * 3, seed=5, augmentation=augmentation,
                       crop_size=crop_size, channels_last=True)
        device, stream = DeviceLoader(ds.train, 128, cuda, **options), StreamLoader(ds.train, 128, cuda, **options)
        for epoch in (0, 1):
            for a, b in zip(_batches(device, epoch), _batches(stream, epoch), strict=True):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_arrays_in_memory_stream_too(synthetic_dir):
    """A split that is not a cache file (arrays given in memory) is gathered with numpy instead of read."""
    from kdlab.data.datasets import Split

    ds = load_dataset("synthetic", synthetic_dir)
    split = Split(np.array(ds.train.images[:300]), ds.train.labels[:300])
    options = dict(train=True, mean=[0.5] * 3, std=[0.25] * 3, seed=1)
    stream = StreamLoader(split, 64, CPU, **options)
    assert stream.file is None and StreamLoader(ds.train, 64, CPU, **options).file is not None
    for a, b in zip(_batches(DeviceLoader(split, 64, CPU, **options), 2), _batches(stream, 2), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_random_resized_crop_boxes_follow_torchvision():
    boxes = resized_crop_boxes(batch_generator(0, 1, 2), 4000, 32, 40)
    x0, y0, w, h, flip = boxes.unbind(1)
    assert torch.equal(boxes, resized_crop_boxes(batch_generator(0, 1, 2), 4000, 32, 40))
    assert not torch.equal(boxes, resized_crop_boxes(batch_generator(0, 1, 3), 4000, 32, 40))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 40).all() and (y0 + h <= 32).all()
    area = w * h / (32 * 40)
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 3 / 4 * 0.8 and ratio.max() < 4 / 3 * 1.25  # rounding to pixels
    assert 0.45 < flip.mean() < 0.55


def test_resized_crop_of_the_whole_image_is_the_image_and_flips():
    images = torch.randint(0, 256, (2, 3, 8, 10), dtype=torch.uint8)
    whole = torch.tensor([[0, 0, 10, 8, 0], [0, 0, 10, 8, 1]], dtype=torch.float32)
    out = resized_crop(images, whole, (8, 10))
    assert torch.allclose(out[0], images[0].float(), atol=1e-3)
    assert torch.allclose(out[1], images[1].float().flip(-1), atol=1e-3)
    corner = resized_crop(images, torch.tensor([[2.0, 4, 4, 4, 0]] * 2), (4, 4))
    assert torch.allclose(corner, images[:, :, 4:8, 2:6].float(), atol=1e-3)
    assert torch.equal(centre_crop(images, (4, 4)), images[:, :, 2:6, 3:7])


def test_residency_is_chosen_by_budget_printed_once_and_forced(synthetic_dir, monkeypatch, capsys):
    ds = load_dataset("synthetic", synthetic_dir)
    cfg = build_config("smoke", "resnet18", overrides={"train_limit": 256, "test_limit": 128})
    monkeypatch.setattr(residency, "_announced", set())
    train, test = residency.make_loaders(cfg, ds, CPU)
    assert isinstance(train, DeviceLoader) and isinstance(test, DeviceLoader)
    err = capsys.readouterr().err
    assert "kept on the device" in err and "data_residency=device|stream" in err
    residency.make_loaders(cfg, ds, CPU)
    assert capsys.readouterr().err == ""  # once per process and dataset
    monkeypatch.setattr(residency, "HOST_SHARE", 1e-9)
    train, _ = residency.make_loaders(cfg, ds, CPU)
    assert isinstance(train, StreamLoader) and "streamed from" in capsys.readouterr().err
    forced = build_config("smoke", "resnet18", overrides={"data_residency": "device"})
    assert isinstance(residency.make_loaders(forced, ds, CPU)[0], DeviceLoader)


def test_a_run_streamed_is_the_run_on_the_device(tmp_path, tiny):
    device = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path / "a", **{**tiny, "epochs": 1},
                         data_residency="device")
    stream = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path / "b", **{**tiny, "epochs": 1},
                         data_residency="stream")
    assert device.run_id == stream.run_id  # the residency is where the data is, not what the run computes
    assert device.history[0]["train_loss"] == stream.history[0]["train_loss"]
    assert device.final_acc == stream.final_acc


def test_an_imagenet_style_folder_trains_as_it_is(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "mini-imagenet"
    for split, count in (("train", 16), ("val", 6)):
        for c in range(2):
            (root / split / f"n0{c}").mkdir(parents=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(18, 40, 2))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"n0{c}" / f"{i}.JPEG")
    record = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path / "runs", dataset=str(root), width=0.0625,
                         epochs=1, batch_size=8, image_size=20, crop_size=16, augmentation="random-resized-crop")
    assert record.status == "done" and record.config["data_info"]["image_size"] == [20, 20]
    assert record.config["crop_size"] == 16
    with pytest.raises(UserError, match="crop_size needs augmentation=random-resized-crop"):
        build_config("smoke", "resnet18", overrides={"crop_size": 16})


def test_imagenet_preset_is_the_benchmark_recipe():
    cfg = build_config("imagenet", "torchvision:resnet18", overrides={"method": "kd", "teacher": "x"})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (100, 256, 0.1, 0.9, 1e-4)
    assert cfg.scheduler == "multistep" and [round(m * cfg.epochs) for m in cfg.milestones] == [30, 60, 90]
    assert (cfg.temperature, cfg.alpha) == (1.0, 0.5)
    assert (cfg.augmentation, cfg.image_size, cfg.crop_size) == ("random-resized-crop", 256, 224)
    assert math.isclose(build_config("imagenet", "resnet18", overrides={"batch_size": 1024}).lr, 0.4)
    assert build_config("imagenet", "resnet18", overrides={"batch_size": 1024, "lr": 0.3}).lr == 0.3


def test_old_run_ids_are_unchanged():
    # build_config("paper", "resnet18") hashed so before the data settings were added.
    assert build_config("paper", "resnet18").run_hash() == "c6485bcfe29f79f3"
    cfg = build_config("paper", "resnet18", overrides={"data_residency": "stream", "cache_dir": "/elsewhere"})
    assert cfg.run_hash() == "c6485bcfe29f79f3"
    assert build_config("paper", "resnet18", overrides={"image_size": 64}).run_hash() != "c6485bcfe29f79f3"


def test_imagenet_grid_plans_without_the_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdlab.cli", "grid", "--teachers", "torchvision:resnet34",
                           "--students", "torchvision:resnet18", "--preset", "imagenet", "--dataset",
                           str(tmp_path / "imagenet"), "--dry-run", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("3 runs planned") and "teacher" in lines[0] and "distill" in lines[2]
    assert "provisional" in proc.stderr and not (tmp_path / "runs").exists()

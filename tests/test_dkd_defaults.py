"""DKD's defaults train on small data: alpha and beta scaled by min(1, 0.01/lr), where the authors'
CIFAR-100 weights leave a VGG student at chance (issue 17; benchmarks/dkd_small_data.py measures it
on 1,437 digit images)."""

from __future__ import annotations

import numpy as np
import pytest

import kdlab
from kdlab.configure import build_config
from kdlab.methods import METHODS
from kdlab.methods.dkd import weight_scale


def _dkd(lr: float, **method_args):
    return build_config("smoke", "vgg16", overrides={"method": "dkd", "teacher": "t", "lr": lr,
                                                     "method_args": method_args})


@pytest.mark.parametrize("lr, scale, version", [(0.005, 1.0, 2), (0.01, 1.0, 2), (0.1, 0.1, 3), (0.2, 0.05, 3)])
def test_the_weights_scale_with_the_lr_and_only_changed_runs_are_new(lr, scale, version):
    cfg = _dkd(lr)
    assert weight_scale({**METHODS["dkd"].defaults, **cfg.method_args}, cfg.lr) == pytest.approx(scale)
    # Version 2 where DKD computes what it did (so those runs keep their ids), 3 where it changed.
    assert METHODS["dkd"].versions(cfg) == {"dkd": version}
    assert METHODS["dkd"].versions(_dkd(lr, scale=1)) == {"dkd": 2}  # the authors' weights, asked for


def test_a_bad_scale_is_one_line():
    from kdlab.errors import UserError

    for bad in ("half", -1, True):
        with pytest.raises(UserError, match="method 'dkd': scale"):
            _dkd(0.1, scale=bad)


def _bands(root, classes=10, per_class=32, size=32):
    """Ten classes of noisy grey levels: a tiny student learns them in a few epochs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 3)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(255 * label / (classes - 1) + rng.integers(-40, 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_dkd_defaults_train_where_the_authors_weights_leave_a_vgg_at_chance(tmp_path):
    data = str(_bands(tmp_path / "bands"))
    common = {"data": data, "preset": "smoke", "runs_dir": tmp_path / "runs", "width": 0.0625, "epochs": 3,
              "tensorboard": False}
    teacher = kdlab.train("vgg16", **common)
    # kdlab's default (0.1x at the smoke preset's lr 0.1) trains: above chance, and flagged by nothing.
    default = kdlab.distill(teacher.run_id, "vgg16", method="dkd", **common)
    assert default.health == "ok"
    assert default.history[-1]["train_acc"] >= 15
    # The authors' weights at that lr: the first epoch's updates silence the student's ReLU classifier
    # (constant logits), and the health check says so.
    authors = kdlab.distill(teacher.run_id, "vgg16", method="dkd", method_args={"scale": 1}, **common)
    assert authors.health.startswith("not learning: training accuracy stayed at chance (10.0%)")
    assert authors.final_acc <= 15 < default.final_acc

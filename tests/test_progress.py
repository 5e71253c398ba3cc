"""Progress a person can plan around: elapsed time and ETAs per epoch, run and grid; a live area that
moves on its own on a terminal; nothing but per-epoch lines elsewhere."""

from __future__ import annotations

import io
import time

from kdlab.progress import Progress, fmt_eta, live_session

METRICS = {"train_loss": 1.0, "train_acc": 50.0, "test_acc": 55.0, "time_s": 0.1}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wait_for(condition, limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_not_a_terminal_gets_one_line_per_epoch_with_eta():
    out = io.StringIO()
    progress = Progress(3, 4, 8, label="resnet18@0.0625/ce", stream=out)
    for epoch in (1, 2):
        for step in range(1, 5):
            progress.tick(epoch, step)
        progress.step(epoch, 4, 1.0, 50.0)
        progress.epoch_done(epoch, METRICS)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all("elapsed" in line and "ETA" in line for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert progress.eta_run() is not None and progress.eta_run() >= 0


def test_terminal_line_moves_without_the_loop():
    out = Terminal()
    with live_session(out):
        progress = Progress(2, 100, 8, label="vgg16@0.0625/kd", stream=out)
        progress.tick(1, 1)  # then a step that takes long: no more calls from the loop
        drawn = out.getvalue().count("elapsed")
        assert _wait_for(lambda: out.getvalue().count("elapsed") >= drawn + 2)  # redrawn by the area's thread
        assert "epoch ETA" in out.getvalue() and "run ETA" in out.getvalue()
    assert out.getvalue().endswith("\x1b[J")  # the live lines are cleared at the end


def test_grid_shows_run_k_of_n_with_its_eta(tmp_path, synthetic_dir, monkeypatch):
    import sys

    from kdlab.grid_runs import GridSpec, plan, run_grid

    runs = plan(GridSpec(teachers=["resnet18"], students=["vgg16"], preset="smoke", dataset="synthetic",
                         data_dir=str(synthetic_dir),
                         overrides={"epochs": 1, "train_limit": 128, "test_limit": 64, "batch_size": 64}))
    logged: list[str] = []
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_grid(runs, tmp_path / "runs", quiet=False, log=logged.append)
    assert [line.split(":")[0] for line in logged] == ["run 1 of 3", "run 2 of 3", "run 3 of 3"]
    assert "grid ETA" in logged[-1] and "elapsed" in logged[-1]
    assert "grid [" in terminal.getvalue() and "of 3" in terminal.getvalue()  # the overall bar, live
    assert "epoch 1/1 [" in terminal.getvalue()  # and the current run's


def test_eta_format():
    assert [fmt_eta(x) for x in (None, 5, 125, 3 * 3600 + 120)] == ["?", "5s", "2m05s", "3h02m"]

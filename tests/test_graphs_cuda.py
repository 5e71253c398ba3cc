"""CUDA graphs and streams on a real GPU (run by `benchmarks/gpu_check.sh check`).

Every method's step, its teacher's forward and the evaluation must be captured (no fallback to
eager), and a graph-replayed group of runs on separate streams must compute what the same runs
compute eagerly one by one. Without a GPU the same tests run tiny and eagerly on the CPU, where
they only check that this file's own code still drives the engine (so it cannot rot unseen
between GPU sessions); the assertions about capture need CUDA.
"""

from __future__ import annotations

import pytest
import torch

from kdlab.config import build_config
from kdlab.engine import Engine, Job
from kdlab.loop import build, build_loaders, lr_factor, prepare_teacher
from kdlab.models import create_model
from kdlab.timing import SegmentTimer

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
METHODS = ["kd", "dkd", "fitnets", "at", "rkd", "sp", "eskd", "dml", "byot", "paper_snippet", "combo"]
COMBO = {"parts": {"kd": 1.0, "rkd": 1.0}}
# On a GPU: 640 images, batches of 64 (10 steps an epoch, so each step is captured in epoch 1).
# On a CPU: just enough to go through every path once.
SIZES = {"train_limit": 640, "test_limit": 250, "batch_size": 64} if CUDA else \
    {"train_limit": 64, "test_limit": 50, "batch_size": 32}


def cfg_for(data_dir: str, method: str, graphs: bool, **extra) -> object:
    args = COMBO if method == "combo" else {"stop_epoch": 1} if method == "eskd" else {}  # ESKD: recapture at 1
    teacher = None if method in ("dml", "byot") else "t"
    return build_config("fast", "resnet18", overrides={
        "dataset": "synthetic", "data_dir": data_dir, **SIZES, "width": 0.125, "eval_batch_size": 100,
        "device": DEVICE, "method": method, "teacher": teacher, "method_args": args, "graphs": graphs,
        "precision": "bf16", **extra})


def train(cfgs: list, teacher_model, dataset, epochs: int = 2) -> tuple[list[Job], Engine, list[list[float]]]:
    """`epochs` epochs of the given runs side by side through the engine; per-epoch training losses."""
    device = torch.device(DEVICE)
    teacher = prepare_teacher(teacher_model, cfgs[0], "t") if teacher_model is not None else None
    train_loader, test_loader = build_loaders(cfgs[0], dataset, device)
    jobs = []
    for cfg in cfgs:
        job = Job(cfg, cfg.run_hash(), teacher if cfg.teacher else None, cfg.method)
        job.s = build(cfg, dataset, teacher_model if cfg.teacher else None)
        job.timer = SegmentTimer(device)
        jobs.append(job)
    engine = Engine(jobs, train_loader, test_loader, device, cfgs[0].precision)
    losses: list[list[float]] = [[] for _ in jobs]
    steps = len(train_loader)
    for epoch in range(epochs):
        engine.start_epoch(jobs, epoch)
        for step, batch in enumerate(train_loader.epoch(epoch)):
            engine.step(jobs, batch, [j.cfg.lr * lr_factor(j.cfg, epoch, step, steps) for j in jobs])
        for i, job in enumerate(jobs):
            losses[i].append(engine.read(job)["loss"])
        engine.evaluate(jobs)
    if CUDA:
        torch.cuda.synchronize()
    return jobs, engine, losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kdlab.data import load_dataset

    root = tmp_path_factory.mktemp("data")
    load_dataset("synthetic", root)
    return str(root)


@pytest.fixture(scope="module")
def data(data_dir):
    from kdlab.data import load_dataset

    return load_dataset("synthetic", data_dir)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_captured(method, data, data_dir):
    teacher_model = create_model("resnet18", 0.125) if method not in ("dml", "byot") else None
    jobs, engine, losses = train([cfg_for(data_dir, method, graphs=True)], teacher_model, data,
                                 epochs=3 if CUDA else 2)
    job = jobs[0]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses[0])
    steps = [job.train_step, job.eval_step, *engine.teacher_steps.values()]
    assert all(c.fallback is None for c in steps), [c.fallback for c in steps]
    if CUDA:
        assert job.train_step.captures >= 1 and job.eval_step.captures == 1
        assert all(c.captures == 1 for c in engine.teacher_steps.values())
        if method == "eskd":
            assert job.train_step.captures == 2  # captured again once KD stopped
    else:
        assert all(c.captures == 0 for c in steps)  # on a CPU every step runs eagerly


def test_a_graphed_group_on_streams_computes_what_eager_runs_compute_alone(data, data_dir):
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        teacher_model = create_model("resnet18", 0.125)
        methods = ["kd", "fitnets", "dkd"]
        graphed = [cfg_for(data_dir, m, graphs=True, precision="fp32") for m in methods]
        _, _, together = train(graphed, teacher_model, data)
        for i, m in enumerate(methods):
            _, _, alone = train([cfg_for(data_dir, m, graphs=False, precision="fp32")], teacher_model, data)
            assert together[i] == pytest.approx(alone[0], rel=1e-4), m
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark


def test_a_run_with_graphs_records_its_capture_time(tmp_path, data_dir):
    import kdlab

    rec = kdlab.train("resnet18", preset="fast", runs_dir=tmp_path, dataset="synthetic", data_dir=data_dir,
                      device=DEVICE, width=0.125, epochs=2, eval_batch_size=100, **SIZES)
    assert rec.status == "done" and "compile_s" in rec.timing
    assert rec.timing["compile_s"] > 0 if CUDA else rec.timing["compile_s"] == 0

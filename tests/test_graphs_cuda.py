"""CUDA graphs and streams on a real GPU (skipped without one; run by `benchmarks/gpu_check.sh check`).

Every method's step, its teacher's forward and the evaluation must be captured (no fallback to
eager), and a graph-replayed group of runs on separate streams must compute what the same runs
compute eagerly one by one.
"""

from __future__ import annotations

import pytest
import torch

from kdlab.config import build_config
from kdlab.engine import Engine, Job
from kdlab.loop import build, build_loaders, lr_factor, prepare_teacher
from kdlab.models import create_model
from kdlab.timing import SegmentTimer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = ["kd", "dkd", "fitnets", "at", "rkd", "sp", "eskd", "dml", "byot", "paper_snippet"]
COMBO = {"parts": {"kd": 1.0, "rkd": 1.0}}


def cfg_for(tiny: dict, method: str, graphs: bool, **extra) -> object:
    args = COMBO if method == "combo" else {"stop_epoch": 1} if method == "eskd" else {}  # ESKD: recapture at 1
    teacher = None if method in ("dml", "byot") else "t"
    return build_config("fast", "resnet18", overrides={
        **tiny, "width": 0.125, "batch_size": 64, "eval_batch_size": 100, "device": "cuda", "method": method,
        "teacher": teacher, "method_args": args, "graphs": graphs, "precision": "bf16", **extra})


def train(cfgs: list, teacher_model, dataset, epochs: int = 2) -> tuple[list[Job], Engine, list[list[float]]]:
    """`epochs` epochs of the given runs side by side through the engine; per-step training losses."""
    device = torch.device("cuda")
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
    torch.cuda.synchronize()
    return jobs, engine, losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kdlab.data import load_dataset

    root = tmp_path_factory.mktemp("data")
    return load_dataset("synthetic", root)


@pytest.fixture
def tiny_cuda(data):
    return {"dataset": "synthetic", "train_limit": 640, "test_limit": 250}


@pytest.mark.parametrize("method", [*METHODS, "combo"])
def test_every_method_is_captured(method, data, tiny_cuda):
    teacher_model = create_model("resnet18", 0.125) if method not in ("dml", "byot") else None
    jobs, engine, losses = train([cfg_for(tiny_cuda, method, graphs=True)], teacher_model, data, epochs=3)
    job = jobs[0]
    assert job.train_step.fallback is None and job.train_step.captures >= 1
    assert job.eval_step.fallback is None and job.eval_step.captures == 1
    assert all(c.fallback is None for c in engine.teacher_steps.values())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses[0])


def test_a_graphed_group_on_streams_computes_what_eager_runs_compute_alone(data, tiny_cuda):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        teacher_model = create_model("resnet18", 0.125)
        methods = ["kd", "fitnets", "dkd"]
        graphed = [cfg_for(tiny_cuda, m, graphs=True, precision="fp32") for m in methods]
        _, _, together = train(graphed, teacher_model, data)
        for i, m in enumerate(methods):
            _, _, alone = train([cfg_for(tiny_cuda, m, graphs=False, precision="fp32")], teacher_model, data)
            assert together[i] == pytest.approx(alone[0], rel=1e-4), m
    finally:
        torch.backends.cudnn.deterministic = False


def test_a_run_with_graphs_records_its_capture_time(tmp_path, tiny_cuda):
    import kdlab

    rec = kdlab.train("resnet18", preset="fast", runs_dir=tmp_path,
                      **{**tiny_cuda, "width": 0.125, "batch_size": 64, "epochs": 2, "data_dir": str(tmp_path / "d")})
    assert rec.status == "done" and rec.timing["compile_s"] > 0

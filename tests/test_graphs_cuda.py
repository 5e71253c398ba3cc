"""CUDA graphs and streams on a real GPU (run by `benchmarks/gpu_check.sh check`).

On a GPU these check what only a GPU can show: every method's step, its teacher's forward and the
evaluation captured (no fallback to eager) and free of host synchronisation in the steady state
(`torch.cuda.set_sync_debug_mode("error")`); a graph-replayed group on streams equal to the same
runs trained eagerly one by one (training losses, evaluation, parameters and momentum buffers); a
teacher whose students change mid-run feeding each its current outputs; device memory flat between
epochs and back to where it was after a group; and the figures of a fast-preset group of 9 students
and 3 teachers (peak memory, steps per second with graphs on and off), written to
`$KDLAB_CHECK_OUT/check-figures.json` when that is set.

Without a GPU the same tests run tiny and eagerly on the CPU, where they only check that this
file's own code still drives the engine (so it cannot rot unseen between GPU sessions); what a
capture demands is checked on the CPU by `tests/test_capture.py`.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from kdlab.configure import build_config
from kdlab.engine import Engine
from kdlab.job import make_job, prepare_teacher
from kdlab.loop import build_loaders, lr_factor, run_group
from kdlab.methods import METHODS
from kdlab.models import create_model
from kdlab.store import Store

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_TEACHER = ("ce", "dml", "byot")
ARGS = {"combo": {"parts": {"kd": 1.0, "rkd": 1.0}}, "eskd": {"stop_epoch": 1}}  # ESKD: captured again at 1
# On a GPU: 640 images, batches of 64 (10 steps an epoch, so each step is captured in epoch 1).
# On a CPU: just enough to go through every path once.
SIZES = {"train_limit": 640, "test_limit": 250, "batch_size": 64} if CUDA else \
    {"train_limit": 64, "test_limit": 50, "batch_size": 32, "threads": 1, "channels_last": False}


def cfg_for(data_dir: str, method: str, graphs: bool, **extra) -> object:
    return build_config("fast", "resnet18", overrides={
        "dataset": "synthetic", "data_dir": data_dir, **SIZES, "width": 0.125, "eval_batch_size": 100,
        "device": DEVICE, "method": method, "teacher": None if method in NO_TEACHER else "t",
        "method_args": ARGS.get(method, {}), "graphs": graphs, "precision": "bf16" if CUDA else "fp32", **extra})


@contextmanager
def no_host_sync():
    """Any op that waits for the device raises (CUDA only)."""
    if not CUDA:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def train(cfgs: list, teacher_model, dataset, epochs: int = 2, strict_from: int | None = None) -> dict:
    """`epochs` epochs of the given runs side by side through the engine: per-epoch training losses and
    evaluations of each, and the jobs and engine (closed). From epoch `strict_from` on, every step
    must run without waiting for the device."""
    device = torch.device(DEVICE)
    teacher = prepare_teacher(teacher_model, cfgs[0], "t") if teacher_model is not None else None
    train_loader, test_loader = build_loaders(cfgs[0], dataset, device)
    jobs = [make_job(cfg, dataset, teacher=teacher if cfg.teacher else None, label=cfg.method, device=device)
            for cfg in cfgs]
    engine = Engine(jobs, train_loader, test_loader, device, cfgs[0].precision)
    losses: list[list[float]] = [[] for _ in jobs]
    evals: list[list[tuple[float, float]]] = [[] for _ in jobs]
    steps = len(train_loader)
    for epoch in range(epochs):
        engine.start_epoch(jobs, epoch)
        strict = strict_from is not None and epoch >= strict_from
        for step, batch in enumerate(train_loader.epoch(epoch)):
            lrs = [j.cfg.lr * lr_factor(j.cfg, epoch, step, steps) for j in jobs]  # changes every step
            with no_host_sync() if strict else nullcontext():
                engine.step(jobs, batch, lrs)
        results = engine.evaluate(jobs)
        for i, job in enumerate(jobs):
            losses[i].append(engine.read(job)["loss"])
            evals[i].append(results[job.run_id])
    if CUDA:
        torch.cuda.synchronize()
    states = [engine.state(j) for j in jobs]
    captured = {"train": [st.train_step.captures for st in states], "eval": [st.eval_step.captures for st in states],
                "teacher": [c.captures for c in engine.teacher_steps.values()],
                "fallbacks": [c.fallback for st in states for c in (st.train_step, st.eval_step) if c.fallback]
                + [c.fallback for c in engine.teacher_steps.values() if c.fallback]}
    engine.close()
    return {"jobs": jobs, "losses": losses, "evals": evals, "captured": captured}


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


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_captured_and_never_waits_for_the_device(method, data, data_dir):
    teacher_model = None if method in NO_TEACHER else create_model("resnet18", 0.125)
    out = train([cfg_for(data_dir, method, graphs=True)], teacher_model, data, epochs=3 if CUDA else 2,
                strict_from=2)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in out["losses"][0])
    assert out["captured"]["fallbacks"] == []
    if CUDA:
        assert out["captured"]["train"][0] == (2 if method == "eskd" else 1)  # ESKD: again once KD stopped
        assert out["captured"]["eval"][0] == 1 and all(c == 1 for c in out["captured"]["teacher"])
    else:
        assert out["captured"]["train"][0] == 0  # on a CPU every step runs eagerly


@contextmanager
def deterministic():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    # The engine leaves cudnn.benchmark off where deterministic kernels were asked for (kdlab.loop.engine_device).
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_a_graphed_group_on_streams_computes_what_eager_runs_compute_alone(data, data_dir):
    with deterministic():
        teacher_model = create_model("resnet18", 0.125)
        methods = ["kd", "fitnets", "dkd", "eskd", "qat"]  # ESKD stops KD after epoch 1; QAT rounds as int8
        together = train([cfg_for(data_dir, m, graphs=True, precision="fp32") for m in methods], teacher_model,
                         data)
        assert together["captured"]["fallbacks"] == []
        for i, m in enumerate(methods):
            alone = train([cfg_for(data_dir, m, graphs=False, precision="fp32")], teacher_model, data)
            assert together["losses"][i] == pytest.approx(alone["losses"][0], rel=1e-4), m
            for (loss_a, acc_a), (loss_b, acc_b) in zip(together["evals"][i], alone["evals"][0], strict=True):
                assert loss_a == pytest.approx(loss_b, rel=1e-4) and acc_a == pytest.approx(acc_b, abs=0.5), m
            a, b = together["jobs"][i], alone["jobs"][0]
            for (name, p), q in zip(a.s.student.named_parameters(), b.s.student.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{m}: {name}")
            for p, q in zip(a.s.optimizer.param_groups[0]["params"], b.s.optimizer.param_groups[0]["params"],
                            strict=True):
                torch.testing.assert_close(a.s.optimizer.state[p]["momentum_buffer"],
                                           b.s.optimizer.state[q]["momentum_buffer"], rtol=1e-4, atol=1e-5, msg=m)


def test_a_shared_teacher_whose_students_change_keeps_feeding_current_outputs(tmp_path, data_dir):
    """kd (3 epochs) and fitnets (1 epoch) share a teacher: from epoch 2 the teacher runs another graph
    (logits only), and kd's captured step must read that graph's outputs, as kd trained alone does."""
    with deterministic():
        torch.manual_seed(0)
        teacher = prepare_teacher(create_model("resnet18", 0.125), cfg_for(data_dir, "kd", True), "t")
        kd = cfg_for(data_dir, "kd", graphs=True, precision="fp32", epochs=3)
        fitnets = cfg_for(data_dir, "fitnets", graphs=True, precision="fp32", epochs=1)
        together = run_group([(kd, teacher, "kd"), (fitnets, teacher, "fitnets")], Store(tmp_path / "a"),
                             quiet=True, silent=True)[kd.run_hash()]
        alone = run_group([(cfg_for(data_dir, "kd", graphs=False, precision="fp32", epochs=3), teacher, "kd")],
                          Store(tmp_path / "b"), quiet=True, silent=True)[kd.run_hash()]
    for a, b in zip(together.history, alone.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_device_memory_is_flat_between_epochs_and_released_after_a_group(tmp_path, data_dir, monkeypatch):
    reserved: list[int] = []
    record = Store.record_epoch

    def record_and_sample(self, *args, **kwargs):
        reserved.append(torch.cuda.memory_reserved() if CUDA else 0)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(Store, "record_epoch", record_and_sample)
    torch.manual_seed(0)
    teacher = prepare_teacher(create_model("resnet18", 0.125), cfg_for(data_dir, "kd", True), "t")
    after = []
    for seed in (0, 1):  # two groups one after the other: the second must not end holding more
        cfgs = [cfg_for(data_dir, m, graphs=True, epochs=4 if CUDA else 2, seed=seed) for m in ("kd", "fitnets", "ce")]
        run_group([(c, teacher if c.teacher else None, c.method) for c in cfgs], Store(tmp_path / "runs"),
                  quiet=True, silent=True)
        after.append(torch.cuda.memory_reserved() if CUDA else 0)
    if CUDA:
        per_group = [reserved[i * 12:(i + 1) * 12] for i in range(2)]  # 3 runs x 4 epochs each
        for samples in per_group:  # from epoch 2 on (every step captured in epoch 1), not a byte more
            assert samples[6:] == [samples[6]] * len(samples[6:]), samples
        assert after[1] <= after[0], after


def test_fast_group_of_nine_students_and_three_teachers(tmp_path):
    """The grid's largest group on a GPU (fast preset: 3 teachers at width 1, each distilled into 3
    students at width 0.5): peak device memory, and steps per second with graphs on and off. Also
    the teachers' forwards alone and the students' steps alone: `barrier_share` is the part of a
    step that overlapping the two (teachers on streams of their own, the next batch copied ahead)
    could save at most."""
    from kdlab.bench import random_dataset

    dataset = random_dataset(n=4096 if CUDA else 64)
    names = ["resnet18", "vgg16", "densenet121"]
    t_width, s_width = (1.0, 0.5) if CUDA else (0.0625, 0.0625)
    device = torch.device(DEVICE)
    figures: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "group": "9 students + 3 teachers"}
    for graphs in (True, False):
        extra = {"dataset": "random", "device": DEVICE, "graphs": graphs, "width": s_width, "method": "kd",
                 "teacher": "t", **({} if CUDA else {"batch_size": 32, "precision": "fp32"})}
        base = build_config("fast", "resnet18", overrides=extra)
        teachers = {t: prepare_teacher(create_model(t, t_width), base, t) for t in names}
        jobs = []
        for t in names:
            for s in names:
                cfg = build_config("fast", s, overrides=extra)
                jobs.append(make_job(cfg, dataset, teacher=teachers[t], run_id=f"{t}->{s}", device=device))
        train_loader, test_loader = build_loaders(base, dataset, device)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        engine = Engine(jobs, train_loader, test_loader, device, base.precision)
        engine.start_epoch(jobs, 0)
        batches = list(train_loader.epoch(0))[:4 if CUDA else 3]
        warmup = 3 if CUDA else 1
        timed = 20 if CUDA else 2
        for i in range(warmup):
            engine.step(jobs, batches[i % len(batches)], [0.1] * len(jobs))
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(timed):
            engine.step(jobs, batches[i % len(batches)], [0.1] * len(jobs))
        if CUDA:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / timed
        key = "graphs" if graphs else "eager"
        if graphs:  # issue 15, item 8: what the step's barrier (teachers first, then the students) costs
            figures["teachers_only_s"] = _timed(
                lambda engine=engine: [engine._run_teacher(t, n) for t, n in engine._needs], timed)
            needs, engine._needs = engine._needs, []  # students alone, reading the teachers' last outputs
            figures["students_only_s"] = _timed(
                lambda engine=engine, jobs=jobs, batch=batches[0]: engine.step(jobs, batch, [0.1] * len(jobs)), timed)
            engine._needs = needs
            figures["step_s"] = seconds
            figures["barrier_share"] = 1 - max(figures["teachers_only_s"], figures["students_only_s"]) / seconds
        figures[f"{key}_steps_per_s"] = 1.0 / seconds
        figures[f"{key}_img_per_s_per_run"] = train_loader.batch_size / seconds
        figures[f"{key}_fallbacks"] = [engine.state(j).train_step.fallback for j in jobs
                                       if engine.state(j).train_step.fallback]
        if CUDA:
            figures[f"{key}_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            figures[f"{key}_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        engine.close()
        del jobs, engine, teachers
        if CUDA:
            torch.cuda.empty_cache()
    figures["graphs_speedup"] = figures["graphs_steps_per_s"] / figures["eager_steps_per_s"]
    out = os.environ.get("KDLAB_CHECK_OUT")
    if out:
        Path(out, "check-figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    assert figures["graphs_fallbacks"] == []


def _timed(fn, reps: int) -> float:
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def test_a_run_with_graphs_records_its_capture_time(tmp_path, data_dir):
    import kdlab

    rec = kdlab.train("resnet18", preset="fast", runs_dir=tmp_path, dataset="synthetic", data_dir=data_dir,
                      device=DEVICE, width=0.125, epochs=2, eval_batch_size=100, **SIZES)
    assert rec.status == "done" and "compile_s" in rec.timing
    assert rec.timing["compile_s"] > 0 if CUDA else rec.timing["compile_s"] == 0

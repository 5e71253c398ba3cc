"""What a CUDA-graph capture demands of every step, checked on a CPU with the stand-in of
`tests/graph_standin.py`: no op that waits for the device or has a data-dependent shape (every
method, the evaluation, the teachers, fp16's loss scaler), replays that compute what eager steps
compute, teachers' outputs read at fixed addresses, and a group's graphs released when it ends."""

from __future__ import annotations

import gc
import os
import weakref

import graph_standin
import pytest
import torch

from kdlab import distributed
from kdlab import job as job_module
from kdlab.configure import build_config
from kdlab.data import load_dataset
from kdlab.engine import Engine
from kdlab.job import make_job, prepare_teacher
from kdlab.loop import build_loaders, run_group
from kdlab.methods import METHODS
from kdlab.models import create_model
from kdlab.store import Store

# 4 training steps and 4 evaluation batches an epoch: the third call of each is captured, the fourth replayed.
SMALL = {"width": 0.0625, "train_limit": 128, "test_limit": 64, "batch_size": 32, "eval_batch_size": 16,
         "dataset": "synthetic", "device": "cpu"}
NO_TEACHER = ("ce", "dml", "byot")
ARGS = {"combo": {"parts": {"kd": 1.0, "rkd": 1.0, "at": 1.0}}, "eskd": {"stop_epoch": 1}}


def config(data_dir, method: str, **extra):
    return build_config("smoke", "resnet18", overrides={
        **SMALL, "data_dir": str(data_dir), "method": method, "method_args": ARGS.get(method, {}),
        "teacher": None if method in NO_TEACHER else "t", **extra})


def teacher_for(cfg):
    torch.manual_seed(1)
    return prepare_teacher(create_model("resnet18", 0.0625, num_classes=10), cfg, "t")


def train(tmp_path, name: str, cfgs: list, teacher=None) -> dict:
    """Train the configs as one group; each run's history and final state (student, optimiser)."""
    store = Store(tmp_path / name)
    records = run_group([(c, teacher if c.teacher else None, c.method) for c in cfgs], store, quiet=True,
                        silent=True)
    out = {}
    for cfg in cfgs:
        rec = records[cfg.run_hash()]
        state = torch.load(rec.checkpoint, weights_only=True)
        out[cfg.run_hash()] = (rec.history, state)
    return out


def assert_same(a: dict, b: dict) -> None:
    for run_id, (history_a, state_a) in a.items():
        history_b, state_b = b[run_id]
        for ea, eb in zip(history_a, history_b, strict=True):
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                assert ea[key] == pytest.approx(eb[key], rel=1e-6, abs=1e-6), (run_id, key)
        for part in ("student", "method"):
            for name, t in state_a[part].items():
                torch.testing.assert_close(t, state_b[part][name], rtol=1e-6, atol=1e-6, msg=f"{part} {name}")
        moments_a = [s.get("momentum_buffer") for s in state_a["optimizer"]["state"].values()]
        moments_b = [s.get("momentum_buffer") for s in state_b["optimizer"]["state"].values()]
        for ma, mb in zip(moments_a, moments_b, strict=True):
            torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-6)


def captured_graphs(monkeypatch) -> list:
    """Install the stand-in; the list fills with every graph captured (tape recorded)."""
    graph_standin.install(monkeypatch)
    made = []
    real = graph_standin.TapeGraph

    def tracked():
        g = real()
        made.append(g)
        return g

    monkeypatch.setattr("kdlab.graphs.new_graph", tracked)
    return made


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"qat"}) + ["qat"])
def test_every_methods_step_is_captured_and_its_replays_compute_what_eager_steps_compute(
        method, tmp_path, synthetic_dir, monkeypatch, capsys):
    cfg = config(synthetic_dir, method)
    eager = train(tmp_path, "eager", [cfg], teacher_for(cfg) if cfg.teacher else None)
    made = captured_graphs(monkeypatch)
    graphed = train(tmp_path, "graphed", [cfg], teacher_for(cfg) if cfg.teacher else None)
    assert "could not capture" not in capsys.readouterr().err
    # The training step and the evaluation (and the teacher's forward) were captured and replayed.
    assert len(made) >= (3 if cfg.teacher else 2) and all(g.replays >= 2 for g in made)
    assert_same(eager, graphed)


def test_fp16_with_its_loss_scaler_is_captured(tmp_path, synthetic_dir, monkeypatch, capsys):
    cfg = config(synthetic_dir, "kd", precision="fp16", epochs=1, test_limit=16)
    eager = train(tmp_path, "eager", [cfg], teacher_for(cfg))
    made = captured_graphs(monkeypatch)
    graphed = train(tmp_path, "graphed", [cfg], teacher_for(cfg))
    assert "could not capture" not in capsys.readouterr().err and made
    assert_same(eager, graphed)
    scaler = eager[cfg.run_hash()][1]["scaler"]
    assert scaler["scale"] == graphed[cfg.run_hash()][1]["scaler"]["scale"] > 0


def test_a_teacher_shared_by_runs_that_stop_at_different_epochs_gives_each_its_current_outputs(
        tmp_path, synthetic_dir, monkeypatch):
    # fitnets needs the teacher's features for one epoch, kd its logits for three: from epoch 2 on
    # the teacher runs another graph (logits only), and kd's captured step must read its outputs.
    kd = config(synthetic_dir, "kd", epochs=3)
    fitnets = config(synthetic_dir, "fitnets", epochs=1)
    captured_graphs(monkeypatch)
    teacher = teacher_for(kd)
    alone = train(tmp_path, "alone", [kd], teacher)
    together = train(tmp_path, "together", [kd, fitnets], teacher)
    assert_same(alone, {kd.run_hash(): together[kd.run_hash()]})


def test_a_group_releases_its_graphs_and_models_when_it_ends(tmp_path, synthetic_dir, monkeypatch):
    captured_graphs(monkeypatch)
    monkeypatch.setattr("kdlab.graphs.release_memory", lambda: None)  # no cyclic collection: refcounts alone
    students = []
    real_build = job_module.build

    def build_and_watch(*args, **kwargs):
        s = real_build(*args, **kwargs)
        students.append(weakref.ref(s.student))
        return s

    monkeypatch.setattr(job_module, "build", build_and_watch)
    cfgs = [config(synthetic_dir, "kd", epochs=1), config(synthetic_dir, "eskd", epochs=2)]
    gc.collect()
    gc.disable()
    try:
        train(tmp_path, "runs", cfgs, teacher_for(cfgs[0]))
        assert len(students) == 2 and all(ref() is None for ref in students)
    finally:
        gc.enable()
    assert graph_standin.TapeGraph.live == []


def test_a_replaced_graph_is_kept_until_the_group_ends(synthetic_dir, monkeypatch):
    made = captured_graphs(monkeypatch)
    cfg = config(synthetic_dir, "eskd", epochs=2)
    dataset = load_dataset("synthetic", synthetic_dir)
    device = torch.device("cpu")
    teacher = teacher_for(cfg)
    train_loader, test_loader = build_loaders(cfg, dataset, device)
    job = make_job(cfg, dataset, teacher=teacher, run_id="r")
    engine = Engine([job], train_loader, test_loader, device, cfg.precision)
    for epoch in range(2):
        engine.start_epoch([job], epoch)
        for batch in train_loader.epoch(epoch):
            engine.step([job], batch, [0.1])
    step = engine.state(job).train_step
    assert step.captures == 2 and len(step.retired) == 1  # KD stopped after epoch 1: captured again
    assert step.retired[0][0].tape  # the first graph still holds what it captured
    engine.close()
    assert all(not g.tape for g in made) and graph_standin.TapeGraph.live == []


# ---- the stand-in itself: it must refuse what a real capture refuses --------------------------------


@pytest.mark.parametrize("op", [
    lambda x, i, m: x[m],
    lambda x, i, m: x.sum().item(),
    lambda x, i, m: m.nonzero(),
    lambda x, i, m: torch.masked_select(x, m),
    lambda x, i, m: torch.unique(i),
    lambda x, i, m: torch.fake_quantize_per_tensor_affine(x, torch.tensor(0.1), torch.tensor(0), 0, 255),
    lambda x, i, m: bool(x.sum() > 0),
])
def test_the_capture_spy_refuses_host_reads_and_data_dependent_shapes(op):
    x, i, m = torch.randn(4, 5), torch.tensor([0, 2]), torch.randn(4, 5) > 0
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"), graph_standin.CaptureSpy():
        op(x, i, m)


def test_the_capture_spy_lets_gathers_and_integer_indexing_through():
    x, i = torch.randn(4, 5), torch.tensor([0, 2])
    with graph_standin.CaptureSpy():
        x[i], x.gather(1, i.view(2, 1)), torch.where(x > 0, x, 0)


# ---- the rewritten DKD and QAT arithmetic: the same values as before ----------------------------------


def dkd_with_masks(s_logits, t_logits, targets, t):
    """DKD's parts as kdlab computed them before (boolean masks): the reference."""
    import torch.nn.functional as F

    s, z = s_logits.float() / t, t_logits.float() / t
    n, c = s.shape
    target = F.one_hot(targets, c).bool()
    s_other, z_other = s[~target].view(n, c - 1), z[~target].view(n, c - 1)

    def binary(all_logits, other):
        lse = torch.logsumexp(all_logits, 1)
        return torch.stack([all_logits[target] - lse, torch.logsumexp(other, 1) - lse], 1)

    tckd = F.kl_div(binary(s, s_other), binary(z, z_other), log_target=True, reduction="batchmean") * t * t
    nckd = F.kl_div(F.log_softmax(s_other, 1), F.log_softmax(z_other, 1), log_target=True,
                    reduction="batchmean") * t * t
    return tckd, nckd


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_dkd_by_gathers_equals_dkd_by_masks(classes):
    from kdlab.losses import dkd_parts

    gen = torch.Generator().manual_seed(classes)
    s = (torch.randn(64, classes, generator=gen) * 3).requires_grad_()
    t, y = torch.randn(64, classes, generator=gen) * 3, torch.randint(0, classes, (64,), generator=gen)
    new, old = dkd_parts(s, t, y, 4.0), dkd_with_masks(s, t, y, 4.0)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    (g_new,) = torch.autograd.grad(new[0] + 8 * new[1], s)
    (g_old,) = torch.autograd.grad(old[0] + 8 * old[1], s)
    torch.testing.assert_close(g_new, g_old, rtol=1e-6, atol=1e-6)


def test_qat_rounding_equals_pytorchs_fake_quantize_values_and_gradients():
    from kdlab.methods.qat import fake_quantize

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(16, 8, 3, 3, generator=gen) * 0.3).requires_grad_()
    scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127).clamp(min=1e-8)
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(16, dtype=torch.int32), 0, -127, 127)
    mine = fake_quantize(w, scale.view(-1, 1, 1, 1), torch.zeros(16, 1, 1, 1), -127, 127)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    x = (torch.randn(64, 8, 5, 5, generator=gen) * 3).requires_grad_()
    for lo, hi in ((-2.0, 4.0), (0.0, 1.0)):  # the second leaves most inputs outside the grid: no gradient there
        scale = torch.tensor((hi - lo) / 255)
        zero = (-torch.tensor(lo) / scale).round()
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zero.int(), 0, 255)
        mine = fake_quantize(x, scale, zero, 0, 255)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
        g = torch.randn(x.shape, generator=gen)
        (g_ref,) = torch.autograd.grad(ref, x, g)
        (g_mine,) = torch.autograd.grad(mine, x, g)
        torch.testing.assert_close(g_mine, g_ref, rtol=0, atol=0)


# ---- settings around graphs ---------------------------------------------------------------------------


def test_nccl_error_handling_is_switched_off_for_graphs_even_where_torchrun_set_it(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # what torchrun may have set
    distributed.graph_safe_nccl()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                 ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_precision_auto_follows_the_gpu(capability, expected, monkeypatch, capsys):
    from kdlab import device as device_module

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some GPU")
    monkeypatch.setattr(device_module, "_ANNOUNCED", set())
    assert device_module.auto_precision(torch.device("cuda")) == expected
    assert device_module.auto_precision(torch.device("cuda")) == expected
    err = capsys.readouterr().err
    assert err.count("precision auto") == 1 and expected in err and f"{capability[0]}.{capability[1]}" in err


def test_precision_auto_is_settled_when_the_config_is_built(monkeypatch):
    # On a CPU (as on a GPU with bf16 units) auto is bf16: the fast preset's runs keep the ids they had.
    fast = build_config("fast", "resnet18")
    assert fast.precision == "bf16"
    assert fast.run_hash() == build_config("fast", "resnet18", overrides={"precision": "bf16"}).run_hash()
    # On a T4 it is fp16 with loss scaling: another run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    t4 = build_config("fast", "resnet18")
    assert t4.precision == "fp16" and t4.run_hash() != fast.run_hash()

"""The engine's parts that a CPU can check: the CUDA-graph state machine (with a stand-in for CUDA's
graph API), in-place running sums, padded evaluation, checkpoints off the training thread, and
the settings that steer them. `tests/test_graphs_cuda.py` checks real capture where a GPU exists."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import kdlab
from kdlab import graphs
from kdlab.config import build_config
from kdlab.errors import UserError


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """CUDA's graph API replaced by a recorder: 'capture' runs the body once (a real capture only
    records it), 'replay' is logged."""
    log: list[str] = []

    class FakeGraph:
        def replay(self) -> None:
            log.append("replay")

    @contextmanager
    def fake_graph(graph, stream=None, capture_error_mode="global"):
        log.append("capture")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return log


def captured(log: list[str], fail_on_capture: bool = False) -> graphs.Captured:
    def fn():
        if fail_on_capture and log and log[-1] == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        log.append("fn")
        return "out"

    return graphs.Captured(fn, torch.device("cuda"), enabled=True, name="step", before=lambda: log.append("before"))


def test_captured_warms_up_captures_once_then_replays(fake_cuda_graphs):
    log, step = fake_cuda_graphs, captured(fake_cuda_graphs)
    for _ in range(graphs.WARMUP_CALLS):
        assert step() == "out"
    assert log == ["before", "fn"] * graphs.WARMUP_CALLS
    log.clear()
    assert step() == "out" and log == ["before", "capture", "fn", "replay"]  # captured, then run
    log.clear()
    step(), step()
    assert log == ["replay", "replay"]  # no Python, no `before` (it would drop the graph's gradients)
    assert step.captures == 1 and step.fallback is None


def test_captured_recaptures_when_the_key_changes(fake_cuda_graphs):
    log, step = fake_cuda_graphs, captured(fake_cuda_graphs)
    for _ in range(graphs.WARMUP_CALLS + 2):
        step(True)
    log.clear()
    step(False)  # e.g. ESKD past its stop epoch: one eager call on the new path, then capture
    step(False)
    step(False)
    assert log == ["before", "fn", "before", "capture", "fn", "replay", "replay"]
    assert step.captures == 2


def test_a_failed_capture_falls_back_to_eager_once_and_for_all(fake_cuda_graphs, capsys):
    log, step = fake_cuda_graphs, captured(fake_cuda_graphs, fail_on_capture=True)
    for _ in range(graphs.WARMUP_CALLS + 3):
        assert step() == "out"
    assert step.graph is None and "not permitted" in step.fallback
    assert log.count("fn") == graphs.WARMUP_CALLS + 3  # every call did its work exactly once
    assert capsys.readouterr().err.count("could not capture step") == 1


def test_captured_is_plain_eager_on_a_cpu():
    calls = []
    step = graphs.Captured(lambda: calls.append(1), torch.device("cpu"), enabled=True, name="step")
    for _ in range(5):
        step()
    assert len(calls) == 5 and step.graph is None and step.fallback is None


def test_a_loss_term_new_at_capture_time_refuses_to_be_captured(monkeypatch):
    from kdlab import engine

    sums = engine.RunningSums(torch.device("cpu"))
    one = torch.ones(())
    sums.add(one, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"ce": one})
    monkeypatch.setattr(graphs, "capturing", lambda: True)
    sums.add(one, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"ce": one})  # known term: fine
    with pytest.raises(RuntimeError, match="'kd' first appeared"):
        sums.add(one, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"ce": one, "kd": one})
    assert sums.read()["steps"] == 3 and sums.read()["terms"]["ce"] == 1.0


def test_evaluation_pads_to_a_fixed_batch_and_counts_only_real_rows(tiny):
    from kdlab.data import load_dataset
    from kdlab.engine import Engine, Job
    from kdlab.loop import build, build_loaders
    from kdlab.timing import SegmentTimer

    cfg = build_config("smoke", "resnet18", overrides={**tiny, "test_limit": 100, "eval_batch_size": 32})
    dataset = load_dataset("synthetic", tiny["data_dir"])
    train, test = build_loaders(cfg, dataset, torch.device("cpu"))
    batches = list(test.epoch(0))
    assert len(batches) == 4 and all(len(b.y) == 32 for b in batches)
    assert int(sum(b.mask.sum() for b in batches)) == 100
    assert bool(batches[-1].mask[3]) and not bool(batches[-1].mask[4])  # 100 = 3 * 32 + 4 real rows
    job = Job(cfg, "r", None, "r", s=build(cfg, dataset, None), timer=SegmentTimer(torch.device("cpu")))
    engine = Engine([job], train, test, torch.device("cpu"), cfg.precision)
    model = job.s.student.eval()
    with torch.no_grad():
        logits = model(torch.cat([b.x[b.mask] for b in batches]))
    y = torch.cat([b.y[b.mask] for b in batches])
    loss, acc = engine.evaluate([job])["r"]
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()) * 100)


def test_checkpoints_every_k_epochs_and_always_the_last(tmp_path, tiny, monkeypatch):
    from kdlab.store import Store

    written = []
    save = Store.save_checkpoint
    monkeypatch.setattr(Store, "save_checkpoint", lambda self, run_id, state: (written.append(state["epoch"]),
                                                                              save(self, run_id, state)))
    rec = kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "epochs": 5, "checkpoint_every": 2})
    assert written == [2, 4, 5] and rec.status == "done" and rec.checkpoint
    assert torch.load(rec.checkpoint, weights_only=True)["epoch"] == 5
    assert {"compile_s", "teacher_s", "student_s"} <= rec.timing.keys()


def test_a_failed_checkpoint_write_fails_the_run(tmp_path, tiny, monkeypatch):
    from kdlab.store import Store

    def full_disk(self, run_id, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "save_checkpoint", full_disk)
    with pytest.raises(OSError):
        kdlab.train("resnet18", preset="smoke", runs_dir=tmp_path, **{**tiny, "epochs": 2})
    (rec,) = Store(tmp_path).runs()
    assert rec.status == "failed" and "No space left" in rec.error


def test_engine_settings_are_checked_and_not_part_of_a_runs_identity():
    with pytest.raises(UserError, match="graphs=false"):
        build_config("fast", "resnet18", overrides={"compile": "reduce-overhead"})
    ok = build_config("fast", "resnet18", overrides={"compile": "reduce-overhead", "graphs": False})
    assert ok.compile == "reduce-overhead"
    with pytest.raises(UserError, match="checkpoint_every"):
        build_config("smoke", "resnet18", overrides={"checkpoint_every": 0})
    plain = build_config("fast", "resnet18")
    assert plain.graphs and plain.compile == "none"
    for change in ({"graphs": False}, {"checkpoint_every": 5}):
        assert build_config("fast", "resnet18", overrides=change).run_hash() == plain.run_hash()


def test_grid_trains_all_runs_sharing_batches_together_on_a_gpu(monkeypatch, synthetic_dir):
    from kdlab import grid_runs as grid

    spec = grid.GridSpec(teachers=["resnet18", "vgg16"], students=["resnet18"], preset="smoke",
                         dataset="synthetic", data_dir=str(synthetic_dir))
    ready = [r for r in grid.plan(spec) if not r.depends_on]  # teachers and the student alone
    assert len(grid._groups(ready)) == 3  # CPU: each alone
    monkeypatch.setattr(grid, "resolve_device", lambda name: torch.device("cuda"))
    assert [len(g) for g in grid._groups(ready)] == [3]  # GPU: one group, steps overlapping on streams

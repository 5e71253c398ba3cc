"""`kdlab compress`, `export`, `latency`, `grid --compress` and the report's deployment table, end to end on a
tiny trained teacher and KD student; every bad input one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdlab.cli import main
from kdlab.deploy import latency
from kdlab.deploy.compress import compress_grid, parse_compress
from kdlab.deploy.runs import artifact_dir, deploy_info, lineage, load_run_model
from kdlab.errors import UserError
from kdlab.models import ModelSource, register_source
from kdlab.store import Store


def _kind(study, source_id: str, quantized: bool):
    return next(r for r in study.made.values() if "deploy" in r.config and r.config["deploy"]["source"] == source_id
                and bool(r.config["deploy"].get("quantize")) == quantized)


def test_compress_makes_every_model_as_a_run(study):
    assert study.code == 0
    by_id = study.made
    pruned = next(r for r in by_id.values() if r.config["model"] == "pruned:resnet18")
    assert pruned.status == "done" and pruned.config["teacher"] == study.teacher.run_id  # the run's own teacher
    assert pruned.config["model_args"]["parent"] == study.student.run_id and pruned.epochs_done == 1
    for source, quantized in [(study.teacher.run_id, False), (study.student.run_id, False),
                              (study.student.run_id, True), (pruned.run_id, False), (pruned.run_id, True)]:
        run = _kind(study, source, quantized)
        assert run.status == "done" and 0 <= run.final_acc <= 100  # accuracy measured in ONNX Runtime
        assert (artifact_dir(study.runs, run.run_id) / "model.onnx").is_file()
        assert lineage(run, by_id)[-1].run_id in (study.teacher.run_id, study.student.run_id)
    fp32, int8 = _kind(study, study.student.run_id, False), _kind(study, study.student.run_id, True)
    info, qinfo = deploy_info(study.runs, fp32.run_id), deploy_info(study.runs, int8.run_id)
    assert info["top1_agreement"] == 100.0 and info["max_abs_diff"] < 1e-3
    assert abs(fp32.final_acc - study.student.final_acc) < 1.0  # ONNX Runtime sees what PyTorch saw
    assert qinfo["top1_agreement_fp32"] >= 80.0  # int8 keeps most top-1 predictions of the trained model
    assert qinfo["size_bytes"] < info["size_bytes"]
    pinfo = deploy_info(study.runs, _kind(study, pruned.run_id, False).run_id)
    assert pinfo["flops"] <= 0.5 * info["flops"] and pruned.params < 0.5 * study.student.params


def test_pruned_run_fine_tuned_and_rebuilds_from_a_moved_runs_dir(study, tmp_path):
    pruned = next(r for r in study.made.values() if r.config["model"] == "pruned:resnet18")
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in pruned.history)
    moved = tmp_path / "moved"
    shutil.copytree(study.runs, moved)
    store = Store(moved, create=False)
    model = load_run_model(store.get(pruned.run_id), moved)  # the pruned file is found in the new place
    store.close()
    start = torch.load(moved / "pruned" / f"{pruned.config['model_args']['sha256'][:16]}.pt", weights_only=True)
    trained = model.state_dict()
    assert trained.keys() == start["state"].keys()
    assert any(not torch.equal(trained[k], start["state"][k]) for k in trained)  # recovery changed the weights
    # Running the same compress again returns every model at once: nothing is trained or made twice.
    assert main(["compress", study.student.run_id, "--prune", "0.5", "--quantize", "int8", "--epochs", "1",
                 "--calibration", "64", "--qat", "never", "--runs-dir", str(moved), "--quiet"]) == 0
    store = Store(moved, create=False)
    assert len(store.runs()) == len(study.made)
    store.close()


def test_merge_carries_onnx_files_and_pruned_weights(study, tmp_path, capsys):
    into = tmp_path / "merged"
    assert main(["merge", str(study.runs), "--into", str(into)]) == 0
    store = Store(into, create=False)
    pruned = next(r for r in store.runs() if r.config["model"] == "pruned:resnet18")
    load_run_model(pruned, into)  # its pruned weights came along
    store.close()
    capsys.readouterr()
    assert main(["report", "--runs-dir", str(into), "--runs-dir", str(study.runs), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["deployment"]["synthetic / smoke"]
    assert len(rows) == 5 and all(r["size_mb"] and r["b1_ms"] for r in rows)  # the ONNX files and timings too


def test_quantization_aware_training_is_the_second_int8_mode(study, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(study.runs, runs)
    monkeypatch.setattr(latency, "ON_CREATION_SECONDS", 0.0)
    assert main(["compress", study.student.run_id, "--quantize", "int8", "--qat", "always", "--epochs", "1",
                 "--calibration", "64", "--runs-dir", str(runs), "--quiet"]) == 0
    assert "student qat int8" in capsys.readouterr().out
    store = Store(runs, create=False)
    qat = next(r for r in store.runs() if r.config["method"] == "qat")
    assert qat.status == "done" and qat.config["teacher"] == study.student.run_id  # the fp32 model teaches its copy
    assert any(r.config.get("deploy", {}).get("source") == qat.run_id and r.config["deploy"].get("quantize")
               for r in store.runs("done"))
    store.close()


def test_export_and_latency_commands(study, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    assert main(["export", study.student.run_id, "--out", str(out), "--runs-dir", str(study.runs)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in text and out.is_file()
    assert main(["latency", study.student.run_id, "--batch", "1,2", "--threads", "1", "--seconds", "0.01",
                 "--json", "--runs-dir", str(study.runs)]) == 0
    entries = json.loads(capsys.readouterr().out)["measurements"]
    assert {(e["runtime"], e["batch"]) for e in entries} >= {("onnxruntime", 1), ("torch-eager", 2)}
    assert all(e["p90_ms"] >= e["median_ms"] > 0 and e["cpu"] for e in entries)
    # PyTorch's figures are kept with the trained run, ONNX Runtime's with its ONNX export (the table's).
    saved = json.loads((artifact_dir(study.runs, study.student.run_id) / "latency.json").read_text())
    assert len(saved) == 2 and {e["runtime"] for e in saved} == {"torch-eager"}
    onnx = json.loads((artifact_dir(study.runs, _kind(study, study.student.run_id, False).run_id)
                       / "latency.json").read_text())
    assert {(e["runtime"], e["batch"], e["threads"]) for e in onnx} >= {("onnxruntime", 2, 1)}
    assert main(["latency", str(out), "--batch", "1", "--threads", "1", "--seconds", "0.01"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_report_has_the_deployment_table_and_plot(study, tmp_path, capsys):
    assert main(["report", "--runs-dir", str(study.runs), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    table = text[text.index("## Deployment"):]
    for kind in ("| teacher | fp32", "| student | fp32", "| int8 | int8", "| pruned 0.5 | fp32",
                 "| pruned 0.5 + int8 | int8"):
        assert kind in table
    assert "pruned:" not in text[:text.index("## Deployment")]  # deployment runs stay out of the study's tables
    assert (tmp_path / "deployment_synthetic_smoke.png").is_file() and (tmp_path / "deployment.csv").is_file()
    assert main(["report", "--runs-dir", str(study.runs), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["deployment"]["synthetic / smoke"]
    assert len(rows) == 5 and all(r["b1_ms"] is not None for r in rows)


def test_grid_compress_plans_after_each_distilled_student(study, capsys, synthetic_dir):
    grid = ["grid", "--teachers", "resnet18", "--students", "resnet18", "--preset", "smoke", "--dataset",
            "synthetic", "--data-dir", str(synthetic_dir), "--runs-dir", str(study.runs), "--dry-run"]
    assert main([*grid, "--compress", "prune=0.5,int8"]) == 0
    assert "after    compress resnet18_half <- resnet18 kd s0" in capsys.readouterr().out
    planned = [SimpleNamespace(role="distill", run_id=study.student.run_id, label="student")]
    spec = parse_compress("prune=0.5,int8,epochs=1,calibration=64,qat=never")
    assert compress_grid(planned, study.runs, spec, log=lambda m: None) == {"compressed": 1, "compress failed": 0}
    assert main([*grid, "--compress", "prune=2"]) == 2
    assert "(0, 1)" in capsys.readouterr().err


@register_source
class _Plain(ModelSource):
    """A model family kdlab's pruning is not tested on."""

    prefix = "plaintest"

    def create(self, name, width, num_classes, **model_args):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, num_classes))


def _snapshot(runs: Path) -> tuple:
    store = Store(runs, create=False)
    rows = [(r.run_id, r.status) for r in store.runs()]
    store.close()
    files = sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if not p.name.startswith("kdlab.db"))
    return rows, files


@pytest.mark.parametrize(("args", "message"), [
    (["compress", "STUDENT", "--prune", "0"], "must be in (0, 1)"),
    (["compress", "STUDENT", "--prune", "1"], "must be in (0, 1)"),
    (["compress", "STUDENT", "--prune", "-0.5", "--quantize", "int8"], "must be in (0, 1)"),
    (["compress", "STUDENT"], "nothing to do"),
    (["compress", "STUDENT", "--quantize", "int8", "--calibration", "100000"], "between 1 and the 256 training"),
    (["compress", "STUDENT", "--prune", "0.5", "--criterion", "random"], "unknown pruning criterion"),
    (["compress", "PENDING", "--prune", "0.5"], "is not finished"),
    (["compress", "FAILED", "--quantize", "int8"], "is not finished"),
    (["compress", "PLAIN", "--prune", "0.5"], "cannot be pruned"),
    (["compress", "ONNX", "--prune", "0.5"], "is an ONNX model"),
    (["compress", "STUDENT", "--prune", "0.5", "--set", "epochs=0"], "epochs must be >= 1"),
    (["export", "STUDENT", "--format", "tflite"], "unknown export format 'tflite'"),
    (["export", "STUDENT", "--opset", "12"], "opset 12 cannot be written"),
    (["export", "STUDENT", "--opset", "99"], "opset 99 cannot be written"),
    (["export", "nosuchrun"], "no run 'nosuchrun'"),
    (["latency", "STUDENT", "--batch", "0"], "--batch values must be >= 1"),
    (["latency", "STUDENT", "--runtime", "tensorrt"], "--runtime takes"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(study, tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    shutil.copytree(study.runs, runs)
    store = Store(runs, create=False)
    for name, status in (("pending", "pending"), ("failed", "failed")):
        store.ensure(name * 2, {**study.student.config, "seed": 99 + len(name)}, name)
        if status == "failed":
            store.fail(name * 2, "RuntimeError: boom")
    plain = {**study.student.config, "model": "plaintest:x", "seed": 7}
    store.ensure("plain" * 3, plain, "plain")
    store.claim("plain" * 3, "me")
    store.finish("plain" * 3, {"final_acc": 10.0, "best_acc": 10.0, "best_epoch": 1, "wall_s": 1.0, "timing": {}})
    store.close()
    onnx = _kind(study, study.student.run_id, False).run_id
    names = {"STUDENT": study.student.run_id, "PENDING": "pending" * 2, "FAILED": "failed" * 2,
             "PLAIN": "plain" * 3, "ONNX": onnx}
    before = _snapshot(runs)
    code = main([names.get(a, a) for a in args] + ["--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _snapshot(runs) == before


def test_without_the_deploy_extra_the_commands_say_what_to_install(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    monkeypatch.setitem(sys.modules, "onnx", None)
    code = main(["export", study.student.run_id, "--runs-dir", str(study.runs)])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "kdlab[deploy]"' in err and err.count("\n") == 1
    with pytest.raises(UserError, match="kdlab\\[deploy\\]"):
        parse_compress("int8")

"""The Python API under the CLI: kdlab.grid / kdlab.report as the commands use them."""

from __future__ import annotations

import kdlab
from kdlab.commands import main


def test_grid_from_python_plans_what_the_command_plans(tmp_path, synthetic_dir, capsys):
    kwargs = {"teachers": ["resnet18@0.125", "vgg16"], "students": "vgg16", "methods": ["kd", "dkd"], "seeds": 2,
              "preset": "smoke", "dataset": "synthetic", "data_dir": str(synthetic_dir),
              "method_args": {"dkd": {"beta": 4.0}}, "student_width": 0.0625, "epochs": 1, "train_limit": 256}
    result = kdlab.grid(runs_dir=tmp_path / "runs", dry_run=True, **kwargs)
    assert result.dry_run and result.states == ["new"] * len(result.runs) and not result.counts
    assert result.records() == [None] * len(result.runs)  # a dry run writes nothing
    assert not (tmp_path / "runs").exists()
    # The command with the same options plans the same runs.
    assert main(["grid", "--teachers", "resnet18@0.125,vgg16", "--students", "vgg16", "--methods", "kd,dkd",
                 "--seeds", "2", "--preset", "smoke", "--dataset", "synthetic", "--data-dir", str(synthetic_dir),
                 "--method-arg", "dkd.beta=4", "--student-width", "0.0625", "--epochs", "1",
                 "--set", "train_limit=256", "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert listed == [r.run_id for r in result.runs]


def test_report_from_python_is_what_the_command_prints(tmp_path, tiny, capsys):
    runs_dir = tmp_path / "runs"
    kdlab.train("resnet18", preset="smoke", runs_dir=runs_dir, **tiny)
    study = kdlab.report(runs_dir, tmp_path / "out")
    assert main(["report", "--runs-dir", str(runs_dir), "--format", "json"]) == 0
    assert capsys.readouterr().out == study.text("json") + "\n"
    assert {p.name for p in study.files} >= {"report.md", "report.json", "report.csv", "report.tex"}


def test_the_catalog_commands_print_what_the_api_returns(capsys):
    import json

    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(kdlab.list_methods()))
    assert main(["models", "resnet18", "--widths", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == kdlab.list_models(["resnet18"], [0.5])

"""`kdlab bench` runs on a CPU with tiny settings and writes its JSON (no timing is asserted)."""

from __future__ import annotations

import json

from kdlab.cli import main


def test_bench_writes_results(tmp_path, capsys):
    code = main(["bench", "--preset", "smoke", "--models", "resnet18,vgg16", "--warmup", "1", "--steps", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "kd/alone" in out
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["environment"]["device"] and data["environment"]["versions"]["torch"]
    assert len(data["throughput"]) == 4  # 2 models x (teacher width, student width)
    assert all(r["engine_img_s"] > 0 and r["eager_img_s"] > 0 for r in data["throughput"])
    pairs = [r for r in data["kd_overhead"] if not r.get("shared_teacher")]
    shared = [r for r in data["kd_overhead"] if r.get("shared_teacher")]
    assert len(pairs) == 4 and len(shared) == 2


def test_bench_bad_input(capsys):
    assert main(["bench", "--what", "magic"]) == 2
    assert "--what" in capsys.readouterr().err

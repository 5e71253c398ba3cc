"""The report: tables, statistics and files from fake finished runs (no training), and the paper's data."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from kdlab import paper
from kdlab.configure import build_config
from kdlab.errors import UserError
from kdlab.reporting import build_report, display_name, render, write_report
from kdlab.store import Store

TW, SW = 0.125, 0.0625  # the smoke preset's teacher and student widths
FAMILIES = ("vgg16", "resnet18", "densenet121")
PAPER_PARAMS = {row.name: row.params for row in paper.TABLE1}
TEACHER_ACC = {"vgg16": 80.0, "resnet18": 82.0, "densenet121": 78.0}
ALONE_ACC = {"vgg16": 70.0, "resnet18": 72.0, "densenet121": 68.0}
SEED_SHIFT = (0.0, 0.3, -0.2)  # alone accuracy per seed
GAIN_SHIFT = (0.0, -0.3, 0.3)  # on top of each cell's mean gain: std exactly 0.3 over 3 seeds
MEAN_GAIN = {(s, t): round(0.1 * (i + 1) - 0.3, 2) for i, (s, t) in
             enumerate((s, t) for s in FAMILIES for t in FAMILIES)}
OWNER = "testhost:1:abc"


def _config(model, width, seed, method="ce", teacher=None, **extra):
    overrides = {"width": width, "seed": seed, "dataset": "synthetic", "method": method, **extra}
    if teacher is not None:
        overrides["teacher"] = teacher
    return build_config("smoke", model, overrides=overrides)


def _add(store, cfg, acc, wall=100.0, status="done", error=None, teacher_s=0.0, run_id=None):
    """Insert one run as the training loop would leave it; returns its id."""
    run_id = run_id or cfg.run_hash()
    store.ensure(run_id, cfg.to_dict())
    if status == "pending":
        return run_id
    assert store.claim(run_id, OWNER) == "claimed"
    name = cfg.model if cfg.width == TW else f"{cfg.model}_half"
    store.set_info(run_id, device="cpu", params=PAPER_PARAMS[name] + 1000, paper_params=PAPER_PARAMS[name])
    for epoch in (1, 2):
        store.record_epoch(run_id, epoch, {"test_acc": acc - 5.0 * (2 - epoch), "train_loss": 1.0 / epoch})
    if status == "failed":
        store.fail(run_id, error or "RuntimeError: boom")
    elif status == "done":
        timing = {"data_s": 0.1 * wall, "teacher_s": teacher_s, "student_s": 0.7 * wall - teacher_s,
                  "eval_s": 0.1 * wall, "other_s": 0.1 * wall, "wall_s": wall}
        store.finish(run_id, {"final_acc": acc, "best_acc": acc + 0.5, "best_epoch": 2, "wall_s": wall,
                              "timing": timing})
    return run_id


def _teachers(store, seeds):
    return {(f, s): _add(store, _config(f, TW, s), TEACHER_ACC[f] + 0.1 * s, wall=300.0)
            for f in FAMILIES for s in seeds}


def _grid(store, seeds=(0, 1, 2), skip=()):
    """The paper's 15 runs per seed: 3 teachers, 3 students alone, 9 KD runs (minus `skip` slots)."""
    teachers = _teachers(store, seeds)
    for f in FAMILIES:
        for s in seeds:
            if (f, None, s) not in skip:
                _add(store, _config(f, SW, s), ALONE_ACC[f] + SEED_SHIFT[s], wall=200.0)
    for student in FAMILIES:
        for t in FAMILIES:
            for s in seeds:
                if (student, t, s) in skip:
                    continue
                acc = ALONE_ACC[student] + SEED_SHIFT[s] + MEAN_GAIN[(student, t)] + GAIN_SHIFT[s]
                _add(store, _config(student, SW, s, "kd", teachers[(t, s)]), acc, wall=250.0, teacher_s=50.0)
    return teachers


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "runs")
    yield s
    s.close()


def _cell(study, student, teacher, method="kd"):
    return next(c for c in study.cells if (c.student, c.teacher, c.method) == (student, teacher, method))


# ---- the full grid -------------------------------------------------------------------------------


def test_full_grid_with_three_seeds(store):
    _grid(store)
    report = build_report(store)
    assert len(report.studies) == 1 and report.notes == []
    study = report.studies[0]
    assert (study.dataset, study.preset, study.recipe, study.seeds) == ("synthetic", "smoke", "", [0, 1, 2])
    assert [(r.model, r.role) for r in study.table1] == [
        ("vgg16", "T"), ("vgg16_half", "S"), ("resnet18", "T"), ("resnet18_half", "S"),
        ("densenet121", "T"), ("densenet121_half", "S")]
    assert len(study.cells) == 9 and study.missing == []
    vgg = study.table1[0]
    assert vgg.acc.mean == pytest.approx(80.1) and vgg.seeds == [0, 1, 2]
    assert vgg.paper_params == 15_239_872 and vgg.time.mean == pytest.approx(300.0)


def test_gain_statistics_match_a_hand_computation(store):
    _grid(store)
    cell = _cell(build_report(store).studies[0], "resnet18_half", "vgg16")
    gain = MEAN_GAIN[("resnet18", "vgg16")]
    # Per-seed gains are gain + (0, -0.3, 0.3): std 0.3, t = gain / (0.3 / sqrt(3)) with 2 df.
    t = gain / (0.3 / math.sqrt(3.0))
    assert cell.gain.n == 3
    assert cell.gain.mean_diff == pytest.approx(gain)
    assert cell.gain.std_diff == pytest.approx(0.3)
    assert cell.gain.p == pytest.approx(1.0 - abs(t) / math.sqrt(t * t + 2.0))
    half = 4.302653 * 0.3 / math.sqrt(3.0)
    assert cell.gain.ci_low == pytest.approx(gain - half, abs=1e-5)
    assert cell.acc.mean == pytest.approx(ALONE_ACC["resnet18"] + 0.1 / 3 + gain)
    assert cell.compression == pytest.approx(2_792_800 / 15_239_872)
    assert cell.time_ratio == pytest.approx(250.0 / 200.0)
    assert cell.timing["teacher_s"] == pytest.approx(50.0)
    assert cell.teacher_time.mean == pytest.approx(300.0)


def test_json_cells_have_the_required_keys(store):
    _grid(store)
    doc = json.loads(render(build_report(store), "json"))
    study = doc["studies"][0]
    assert {"dataset", "preset", "table1", "cells", "missing"} <= set(study)
    for cell in study["cells"]:
        assert {"teacher", "student", "acc", "acc_gain", "time_s", "compression"} <= set(cell)
        assert {"acc_std", "acc_ci", "gain_std", "gain_ci", "gain_p", "gain_significant", "n_seeds"} <= set(cell)
    cell = next(c for c in study["cells"] if (c["student"], c["teacher"]) == ("vgg16_half", "densenet121"))
    assert cell["acc_gain"] == pytest.approx(MEAN_GAIN[("vgg16", "densenet121")])
    assert cell["compression"] == pytest.approx(3_811_680 / 6_880_448)
    assert "paper_vcl" not in cell


def test_every_format_renders(store):
    _grid(store)
    report = build_report(store)
    md = render(report, "md")
    assert "### Table 1" in md and "### Tables 2-3" in md and "### Timing" in md
    assert "| vgg16_half | Acc gain |" in md and "(p=" in md and "n.s." in md
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert {r["section"] for r in rows} == {"table1", "cells"}
    gain = next(r for r in rows if (r["student"], r["teacher"], r["metric"]) == ("vgg16_half", "vgg16", "acc_gain"))
    assert float(gain["mean"]) == pytest.approx(MEAN_GAIN[("vgg16", "vgg16")]) and gain["n"] == "3"
    tex = render(report, "latex")
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"vgg16\_half" in tex
    with pytest.raises(UserError):
        render(report, "html")


def test_single_seed_shows_plain_values(store):
    _grid(store, seeds=(0,))
    report = build_report(store)
    cell = _cell(report.studies[0], "vgg16_half", "vgg16")
    assert cell.gain.n == 1 and cell.gain.p is None
    doc = json.loads(render(report, "json"))
    assert "acc_std" not in doc["studies"][0]["cells"][0] and "gain_p" not in doc["studies"][0]["cells"][0]
    assert "(n=1)" in render(report, "md")


# ---- partial, empty and failed --------------------------------------------------------------------


def test_partial_store_marks_what_is_missing(store):
    teachers = _teachers(store, (0, 1))
    _add(store, _config("resnet18", SW, 0), 72.0)
    for s in (0, 1):
        _add(store, _config("resnet18", SW, s, "kd", teachers[("vgg16", s)]), 72.5 + s)
    planned = _add(store, _config("vgg16", SW, 1), 0.0, status="pending")  # a grid's planned, untrained run
    study = build_report(store).studies[0]
    cell = _cell(study, "resnet18_half", "vgg16")
    assert cell.gain.n == 1 and cell.gain.mean_diff == pytest.approx(0.5)
    kinds = {(m.kind, m.what, m.seed) for m in study.missing}
    assert ("baseline", f"{cell.pair} (kd): no finished resnet18_half (ce) run to pair "
            "with, so no gain for this seed", 1) in kinds
    assert ("unfinished", "vgg16_half (ce, no KD)", 1) in kinds
    # Only what was planned is missing: nothing is invented from the paper's grid shape.
    assert {m.run_id for m in study.missing if m.kind == "unfinished"} == {planned}
    assert len(study.missing) == 2
    for fmt in ("md", "csv", "json", "latex"):
        assert render(study_report := build_report(store), fmt, compare_paper=True)
    assert "Missing or unusable runs" in render(study_report, "md")


def test_roles_and_widths_come_from_the_runs(store):
    # A student at the smoke preset's teacher width (0.125), trained alone: not a teacher.
    _add(store, _config("vgg16", TW, 0), 70.0)
    study = build_report(store).studies[0]
    assert [(r.model, r.role) for r in study.table1] == [("vgg16@0.125", "—")]
    assert study.teacher_width is None and study.missing == []
    # A study of one's own widths: teachers at 0.5, students at 0.125, whatever the preset says.
    teacher = _add(store, _config("resnet18", 0.5, 0), 85.0)
    _add(store, _config("vgg16", TW, 0, "kd", teacher), 71.0)
    study = build_report(store).studies[0]
    assert study.teacher_width == 0.5
    assert [(r.model, r.role) for r in study.table1] == [("vgg16@0.125", "S"), ("resnet18", "T")]
    assert _cell(study, "vgg16@0.125", "resnet18").gain.mean_diff == pytest.approx(1.0)
    assert "Teacher width 0.5" in render(build_report(store), "md")


def test_empty_store(store):
    report = build_report(store)
    assert report.studies == [] and not report.has_results
    assert "No finished runs" in report.notes[0]
    assert "No finished runs" in render(report, "md")
    assert json.loads(render(report, "json"))["studies"] == []
    assert render(report, "csv").startswith("dataset,preset")
    assert "No finished runs" in render(report, "latex", compare_paper=True)


def test_failed_and_pending_runs_are_listed_not_tabled(store):
    teachers = _teachers(store, (0,))
    _add(store, _config("vgg16", SW, 0), 70.0)
    _add(store, _config("vgg16", SW, 0, "kd", teachers[("resnet18", 0)]), 70.4)
    bad = _add(store, _config("vgg16", SW, 0, "kd", teachers[("vgg16", 0)]), 99.0, status="failed",
               error="NonFiniteLoss: loss became nan at epoch 2")
    _add(store, _config("vgg16", SW, 0, "kd", teachers[("densenet121", 0)]), 0.0, status="pending")
    report = build_report(store)
    study = report.studies[0]
    assert [(c.student, c.teacher) for c in study.cells] == [("vgg16_half", "resnet18")]
    failed = next(m for m in study.missing if m.run_id == bad)
    assert (failed.kind, failed.status, failed.what) == ("unfinished", "failed", "vgg16_half <- vgg16 (kd)")
    assert "nan" in failed.error
    assert any(m.status == "pending" and m.what == "vgg16_half <- densenet121 (kd)" for m in study.missing)
    # An unfinished run fills its slot in the missing list once, not again as absent.
    assert not any(m.kind == "absent" and m.what == "vgg16_half <- vgg16 (kd)" for m in study.missing)
    md = render(report, "md")
    assert "failed" in md and "NonFiniteLoss" in md and "99.00" not in md


def test_only_failed_runs_says_no_finished_runs(store):
    _add(store, _config("vgg16", TW, 0), 80.0, status="failed")
    report = build_report(store)
    assert "No finished runs" in report.notes[0]
    assert report.studies[0].missing[0].status == "failed"


def test_unknown_filter_is_a_user_error(store):
    _grid(store, seeds=(0,))
    assert build_report(store, dataset="synthetic", preset="smoke").studies
    with pytest.raises(UserError, match="synthetic/smoke"):
        build_report(store, dataset="cifar10")


# ---- methods, recipes, external teachers ----------------------------------------------------------


def test_method_variants_are_compared_with_plain_kd(store):
    teachers = _grid(store)
    for s, extra in zip((0, 1, 2), (0.1, 0.2, 0.3), strict=True):
        acc = ALONE_ACC["vgg16"] + SEED_SHIFT[s] + MEAN_GAIN[("vgg16", "resnet18")] + GAIN_SHIFT[s] + extra
        _add(store, _config("vgg16", SW, s, "kd", teachers[("resnet18", s)], temperature=4.0), acc)
    report = build_report(store)
    study = report.studies[0]
    assert study.methods == ["kd", "kd(T=4)"]
    variant = _cell(study, "vgg16_half", "resnet18", "kd(T=4)")
    assert variant.gain_vs_kd.mean_diff == pytest.approx(0.2) and variant.gain_vs_kd.std_diff == pytest.approx(0.1)
    assert "### Methods by pair" in render(report, "md")
    assert study.missing == []


def test_changed_recipe_is_a_separate_study(store):
    _add(store, _config("vgg16", TW, 0), 80.0)
    _add(store, _config("vgg16", TW, 0, epochs=5), 85.0)
    names = [s.name for s in build_report(store).studies]
    assert names == ["synthetic / smoke", "synthetic / smoke (epochs=5)"]


def test_external_checkpoint_teacher(store):
    _add(store, _config("resnet18", SW, 0), 72.0)
    _add(store, _config("resnet18", SW, 0, "kd", "file:0123456789abcdef0123"), 72.3)
    cell = build_report(store).studies[0].cells[0]
    assert cell.teacher == "file:01234567" and cell.compression is None
    assert cell.gain.mean_diff == pytest.approx(0.3)


def test_teacherless_method_is_compared_with_the_student_alone(store):
    _add(store, _config("resnet18", SW, 0), 72.0)
    _add(store, _config("resnet18", SW, 1), 72.4)
    online = _config("resnet18", SW, 0)
    online.method = "dml"  # an online method (no teacher run): not registered yet, so set after validation
    _add(store, online, 72.5, run_id="dml0")
    online.seed = 1
    _add(store, online, 73.1, run_id="dml1")
    report = build_report(store)
    cell = report.studies[0].cells[0]
    # No run is a teacher, so no width is "the teacher width": names carry the width itself.
    assert (cell.student, cell.teacher, cell.method, cell.online) == ("resnet18@0.0625", None, "dml", True)
    assert cell.gain.mean_diff == pytest.approx(0.6) and cell.compression is None
    md = render(report, "md")
    assert "### Methods by pair" in md and "| dml | Gain vs alone |" in md
    assert json.loads(render(report, "json"))["studies"][0]["cells"][0]["teacher"] is None


def test_report_api_reads_a_runs_dir(tmp_path):
    from kdlab.reporting import report

    with pytest.raises(UserError, match="no kdlab runs database"):
        report(tmp_path / "nowhere")
    store = Store(tmp_path / "runs")
    _grid(store, seeds=(0,))
    store.close()
    result = report(tmp_path / "runs", tmp_path / "out", formats=("md", "json"), plots=False)
    assert result.has_results and [p.name for p in result.files] == ["report.md", "report.json"]


def test_duplicates_and_unknown_teachers_are_reported(store):
    old = _add(store, _config("vgg16", SW, 0, eval_batch_size=100), 69.0)  # eval batch size is not a recipe
    _add(store, _config("vgg16", SW, 0), 70.0)
    _add(store, _config("vgg16", SW, 0, "kd", "0123456789abcdef"), 70.5)  # a teacher run no longer stored
    study = build_report(store).studies[0]
    assert study.table1[0].acc.mean == 70.0  # the newer run
    assert any(m.kind == "duplicate" and m.run_id == old for m in study.missing)
    cell = study.cells[0]
    assert cell.teacher == "run:01234567" and cell.gain.mean_diff == pytest.approx(0.5)
    assert any(m.kind == "teacher" and m.what == "vgg16@0.0625 <- run:01234567 (kd)" for m in study.missing)


def test_display_names():
    assert display_name("resnet18", 1.0, 1.0) == "resnet18"
    assert display_name("resnet18", 0.5, 1.0) == "resnet18_half"
    assert display_name("resnet18", 0.0625, 0.125) == "resnet18_half"
    assert display_name("vgg16", 0.25, 1.0) == "vgg16@0.25"


# ---- the paper, side by side ----------------------------------------------------------------------


def test_compare_paper_puts_the_papers_numbers_beside_ours(store):
    _grid(store)
    report = build_report(store)
    md = render(report, "md", compare_paper=True)
    assert "92.72" in md and "not a reproduction" in md and "VCL 91.98 / Colab 91.63" in md
    doc = json.loads(render(report, "json", compare_paper=True))
    study = doc["studies"][0]
    vgg = next(r for r in study["table1"] if r["model"] == "vgg16")
    assert vgg["paper_vcl"]["acc"] == 92.72 and vgg["paper_colab"]["acc"] == 93.4
    assert vgg["paper_vcl"]["time_s"] == 1219 and vgg["paper_colab"]["time_s"] is None
    cell = next(c for c in study["cells"] if (c["student"], c["teacher"]) == ("densenet121_half", "vgg16"))
    assert cell["paper_vcl"]["acc_gain"] == 0.59 and cell["paper_colab"]["acc"] == 86.56
    rows = list(csv.DictReader(io.StringIO(render(report, "csv", compare_paper=True))))
    acc = next(r for r in rows if (r["student"], r["metric"], r["section"]) == ("vgg16", "acc", "table1"))
    assert float(acc["paper_vcl"]) == 92.72 and float(acc["paper_colab"]) == 93.4
    assert "92.72" in render(report, "latex", compare_paper=True)


def test_noise_section_answers_the_papers_question(store):
    _grid(store)
    study = build_report(store).studies[0]
    row = next(r for r in study.noise if (r.student, r.teacher) == ("vgg16_half", "vgg16"))
    assert row.paper_acc_diff == pytest.approx(0.35)  # 91.98 vs 91.63
    assert row.gain_std == pytest.approx(0.3) and row.paper_gain_diff == pytest.approx(0.95)  # +0.46 vs -0.49
    bound = 4.302653 * 0.3 * math.sqrt(2.0)
    assert row.gain_bound == pytest.approx(bound, abs=1e-5) and row.gain_within is True
    assert len([r for r in study.noise if r.teacher]) == 9 and len([r for r in study.noise if not r.teacher]) == 6
    md = render(build_report(store), "md")
    assert "### Noise" in md and "comparisons the paper's VCL-vs-Colab accuracy difference" in md


def test_paper_tables_transcribed():
    assert paper.parse_time("20m 19s") == 1219 and paper.parse_time("104m 3s") == 6243
    with pytest.raises(ValueError):
        paper.parse_time("soon")
    assert paper.table1("vgg16").acc_vcl == 92.72 and paper.table1("densenet121_half").acc_colab == 86.48
    assert paper.table1("resnet18").time_vcl_s == 30 * 60 + 4
    assert paper.kd_cell("densenet121_half", "densenet121", "colab").time_s == 104 * 60 + 3
    assert paper.kd_cell("resnet18_half", "densenet121", "vcl").gain == -0.17
    assert paper.kd_cell("vgg16_half", "vgg16", "colab").acc == 91.63
    assert paper.kd_cell("vgg16_half", "resnet18_half", "vcl") is None
    assert len(paper.TABLE2) == len(paper.TABLE3) == 9


def test_paper_gains_are_kd_minus_student_except_colab_resnet18_half():
    bad = {(c.platform, c.student) for c in paper.inconsistent_gains()}
    assert bad == {("colab", "resnet18_half")} and len(paper.inconsistent_gains()) == 3
    for table in (paper.TABLE2, paper.TABLE3):
        mean = sum(c.gain for c in table.values()) / len(table)
        assert round(mean, 2) == paper.AVERAGE_GAIN[next(iter(table.values())).platform]
        for c in table.values():  # compression: Table 1 params, printed to two digits
            ratio = paper.table1(c.student).params / paper.table1(c.teacher).params
            assert abs(ratio - c.compression) < 0.01


# ---- files and plots ------------------------------------------------------------------------------


def test_write_report_writes_every_format_and_plots(store, tmp_path):
    _grid(store)
    report = build_report(store)
    files = write_report(report, tmp_path / "out")
    names = {p.name for p in files}
    assert {"report.md", "report.json", "report.csv", "report.tex"} <= names
    pngs = [p for p in files if p.suffix == ".png"]
    assert {p.name.split("_", 1)[1] for p in pngs} == {"gain_vs_compression.png", "acc_time_bars.png",
                                                      "curves.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "92.72" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(UserError):
        write_report(report, tmp_path / "out", formats=("pdf",))


def test_plots_skip_when_there_is_nothing_to_draw(store, tmp_path):
    from kdlab.reporting.plots import draw_all

    assert draw_all(build_report(store), tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()
    _add(store, _config("vgg16", TW, 0), 80.0)  # a teacher alone: bars and curves, no gain plot
    names = sorted(p.name for p in draw_all(build_report(store), tmp_path / "plots"))
    assert names == ["synthetic-smoke_acc_time_bars.png", "synthetic-smoke_curves.png"]


def test_report_describes_the_data_and_keeps_intervals_in_range(store):
    import dataclasses

    from kdlab.reporting.plots import acc_time_bars

    info = {"name": "digits", "image_size": [8, 8], "classes": 10, "train": 1437, "test": 360}
    for seed, acc in ((0, 99.6), (1, 92.0)):  # two seeds far apart: the t-interval reaches past 100
        cfg = dataclasses.replace(_config("resnet18", TW, seed), data_fingerprint="3f2a9c0d1e2b4a5c", data_info=info)
        _add(store, cfg, acc)
    report = build_report(store)
    row = report.studies[0].table1[0]
    assert row.acc.ci_high == 100.0 and 0.0 < row.acc.ci_low < row.acc.mean
    md = render(report, "md", compare_paper=True)
    assert "Data: digits (8x8 px, 10 classes, 1,437 train / 360 test images, fingerprint 3f2a9c0d)" in md
    assert "JPEG copy" not in md and "100.00]" in md
    assert report.studies[0].dataset == "digits" and build_report(store, dataset="3f2a9c0d").studies
    fig = acc_time_bars(report.studies[0])
    acc_axis, time_axis = fig.axes[:2]
    assert acc_axis.get_ylim()[0] == 0.0 and "axis from 0" in acc_axis.get_ylabel()
    assert time_axis.get_ylabel() == "wall time (s)"  # 100-second runs read in seconds, not minutes

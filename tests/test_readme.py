"""The README as a user meets it: its install commands say where they run, its Python example runs
and is one run however often it is called."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_install_commands_say_where_they_run():
    text = README.read_text()
    relative = [m.start() for m in re.finditer(re.escape("pip install -c constraints.txt"), text)]
    assert relative
    for at in relative:
        # Paths relative to the checkout: the line, its paragraph or the one before says so.
        start = text.rfind("\n\n", 0, max(0, text.rfind("\n\n", 0, at)))
        near = " ".join(text[max(0, start):text.find("\n\n", at)].split())
        assert "root of your kdlab checkout" in near or "checkout's root" in near, near[:200]
    # ...and the form that works from any folder is given.
    assert 'pip install -c "$KDLAB/constraints.txt" "$KDLAB[timm]"' in text


def _python_example() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (example,) = [b for b in blocks if "kdlab.distill(teacher=teacher" in b]
    return textwrap.dedent(example)


def test_the_python_api_example_runs_and_is_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes ./runs
    code = _python_example()
    printed = []
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
        printed.append(out.getvalue().split())
    run_id, model = printed[0][:2]
    assert model.startswith("module:Sequential.")
    assert printed[1] == printed[0]  # the same call again: the same run, returned from the store
    assert len(list((tmp_path / "runs" / "checkpoints").glob("*.pt"))) == 1


def test_the_python_section_runs_the_grid_and_the_report(tmp_path, monkeypatch, synthetic_dir):
    """The README's Python section (train, distill, grid, report) as written, on tiny data."""
    import kdlab

    monkeypatch.chdir(tmp_path)  # it writes ./runs
    tiny = {"data_dir": str(synthetic_dir), "train_limit": 256, "test_limit": 128, "batch_size": 64,
            "eval_batch_size": 128}
    for name in ("train", "distill", "grid"):
        real = getattr(kdlab, name)
        extra = {**tiny, "width": 0.0625} if name != "grid" else tiny  # the grid sets each run's width
        monkeypatch.setattr(kdlab, name, lambda *a, _real=real, _extra=extra, **k: _real(*a, **{**k, **_extra}))
    text = README.read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "kdlab.grid(" in b]
    printed = []
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
        printed.append(out.getvalue().splitlines())
    assert printed[0][1] == "3 trained, 0 skipped, 0 failed"
    assert printed[1][1] == "0 trained, 3 skipped, 0 failed"  # the same study again: nothing to train
    roles = [line.split()[0] for line in printed[0][2:5]]
    assert roles == ["teacher", "student", "distill"] and all(" done " in line for line in printed[0][2:5])
    assert "### Table 1: training without KD" in "\n".join(printed[0])

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

"""`python -m bench` without matplotlib: the CSV and markdown results are written, the plot is skipped
with a message instead of a traceback (matplotlib is hidden by an import that fails)."""

import os
import sys

from bench.__main__ import main as bench_main


def test_select_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = str(tmp_path)
    assert bench_main(["select", "--quick", "--B", "1", "--threads", "1", "--out", out]) == 0
    stem = os.path.join(out, "select_quick")
    assert os.path.getsize(stem + ".csv") > 0
    assert "| official |" in open(stem + ".md").read()
    assert not os.path.exists(stem + ".png")
    assert f"plot skipped (matplotlib not installed): {stem}.png not written" in capsys.readouterr().out

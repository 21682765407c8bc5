"""tools/fuzz_select.py: a fixed-seed run passes every check, and a broken backend fails it."""

import os
import re
import sys

import torch

from otprune import backends

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import fuzz_select  # noqa: E402


def summary(out: str) -> dict:
    """{check: (passed, near-tie, failed, undecided)} from the tool's table."""
    rows = {}
    for check in fuzz_select.CHECKS:
        m = re.search(rf"^{re.escape(check)}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
        assert m, f"no summary row for {check!r} in:\n{out}"
        rows[check] = tuple(int(v) for v in m.groups())
    return rows


def test_fixed_seed_run_passes_every_check(capsys):
    assert fuzz_select.main(["--cases", "40", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for check, (passed, _, failed, _) in summary(out).items():
        assert failed == 0, out
        assert passed > 0, f"{check} never ran:\n{out}"
    assert "40 cases in" in out


def test_broken_backend_is_reported(capsys, monkeypatch):
    be = backends.get_backend("torch")
    greedy = be.greedy

    def shifted(s, ks, gamma, valid, **kwargs):
        """Well-formed but wrong: every pick moved to the next valid token (cyclically)."""
        picks = greedy(s, ks, gamma, valid, **kwargs)
        n = torch.full((s.shape[0], 1), s.shape[-1]) if valid is None else valid.sum(-1, keepdim=True)
        return torch.where(picks >= 0, (picks + 1) % n.to(picks.device), picks)

    monkeypatch.setattr(be, "greedy", shifted)
    assert fuzz_select.main(["--cases", "15", "--seed", "0", "--backends", "torch"]) == 1
    out = capsys.readouterr().out
    assert summary(out)["reference"][2] > 0, out
    m = re.search(r"repro: python tools/fuzz_select.py --case (\d+) --backends torch", out)
    assert m, out
    assert fuzz_select.main(["--case", m.group(1), "--backends", "torch"]) == 1  # the line reproduces it
    monkeypatch.setattr(be, "greedy", greedy)
    assert fuzz_select.main(["--case", m.group(1), "--backends", "torch"]) == 0  # the failing case alone, fixed

"""The environment route's settings check, shared by tests/test_env_route.py (original LLaVA) and
tests/test_env_route_hf.py (transformers LLaVA / LLaVA-NeXT).

A child process runs the ``.pth`` line exactly as ``site`` does, wraps ``otprune.api.select`` with a
spy recording every batched select of the integration (settings and picks, and whether each
image's kept features reached the language model in the order of its picks), and per case of
:data:`ROUTE_CASES` builds a tiny model with the case's variables set, then runs the same prompt
through the route, through ``otprune.apply`` with the same settings and with the defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(ROOT, "otprune_autopatch.pth")

# Non-default settings through the variables, and the same settings given to otprune.apply.
ROUTE_CASES = [
    ({"OTPRUNE_GAMMA": "0.5", "OTPRUNE_NORMALIZE": "token", "OTPRUNE_BACKEND": "torch"},
     {"gamma": 0.5, "normalize": "token", "backend": "torch"}),
    ({"OTPRUNE_COMPAT": "official", "OTPRUNE_GAMMA": "0.2"}, {"compat": "official", "gamma": 0.2}),
]

# The child's script. {setup} defines build() -> a tiny model, generate(model, **kw) -> its
# generate() on a fixed two-row prompt with images, and lm(model) -> the module that receives
# inputs_embeds (the language model).
_SCRIPT = r"""
import json, os, sys
with open(sys.argv[1]) as f:
    exec(f.read())  # what site.py does with the .pth's line (OTPRUNE_KEEP is set: the route is on)
sys.path.insert(0, sys.argv[2])
import torch
import otprune, otprune.api
{setup}
calls, feats, embeds = [], [], []
real = otprune.api.select
def spy(x, keep, **kw):  # every batched select of the integration: its settings and its picks
    out = real(x, keep, **kw)
    if x.ndim == 3:
        calls.append({{"kwargs": {{k: v for k, v in kw.items() if k != "lengths"}}, "picks": out.tolist()}})
        feats.append(x)
    return out
otprune.api.select = spy
def record(module, args, kwargs):
    if kwargs.get("inputs_embeds") is not None:
        embeds.append(kwargs["inputs_embeds"])
def fed_in_order(x, picks, seen):  # each image's picked rows of x (B, N, D), in pick order, are one run of seen (B', T, D)
    flat = seen.reshape(-1, seen.shape[-1])
    for rows, row in zip(x, picks):
        kept = rows[[p for p in row if p >= 0]].to(flat.dtype)
        starts = (flat == kept[0]).all(-1).nonzero().flatten().tolist()
        if not any(torch.equal(flat[s:s + len(kept)], kept) for s in starts):
            return False
    return True
def run(model):
    calls.clear(); feats.clear(); embeds.clear()
    handle = lm(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = generate(model, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    finally:
        handle.remove()
    for call, x in zip(calls, feats):
        call["fed_in_order"] = fed_in_order(x, call["picks"], embeds[0])
    return list(calls), out
report = []
for env, kwargs in json.loads(sys.argv[3]):
    os.environ.update(env)  # the route reads the variables when a model is constructed
    model = build()
    for name in env:
        del os.environ[name]
    route_calls, route_out = run(model)
    otprune.revert(model)
    otprune.apply(model, keep=float(os.environ["OTPRUNE_KEEP"]), **kwargs)
    api_calls, api_out = run(model)
    otprune.revert(model)
    otprune.apply(model, keep=float(os.environ["OTPRUNE_KEEP"]))
    default_calls, _ = run(model)
    report.append({{
        "route": route_calls, "api": api_calls, "default": default_calls,
        "same_output": torch.equal(route_out.sequences, api_out.sequences)
        and all(torch.equal(a, b) for a, b in zip(route_out.scores, api_out.scores)),
    }})
print("REPORT " + json.dumps(report))
"""


def clean_env(**extra: str) -> dict:
    """os.environ without any pruning variable, the repository first on PYTHONPATH, then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OTPRUNE_") and k not in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_route_settings(setup: str) -> list:
    """Run the child script with ``setup`` (Python source defining build() and generate()) and
    OTPRUNE_KEEP=0.25; returns its report (see :func:`check_route_report`)."""
    script = _SCRIPT.format(setup=setup)
    proc = subprocess.run([sys.executable, "-c", script, PTH, os.path.join(ROOT, "tests"), json.dumps(ROUTE_CASES)],
                          env=clean_env(OTPRUNE_KEEP="0.25"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def check_route_report(report: list, cases: list = ROUTE_CASES) -> None:
    """Per case of ``cases``: the route's selects (settings and picks) and outputs equal
    otprune.apply's with the same settings, and every image's kept features reach the language
    model in the order of its picks (ascending, the release's order with compat="official", which
    is not ascending for some image here); the first case's settings change the picks against the
    defaults (so a dropped setting shows). ``report``: per case, {"route", "api", "default":
    [{"kwargs", "picks", "fed_in_order"}] of every batched select, "same_output": bool}."""
    assert len(report) == len(cases)
    for rep, (_env, kwargs) in zip(report, cases):
        assert rep["route"], "the route never selected"
        assert [c["kwargs"] for c in rep["route"]] == [kwargs] * len(rep["route"])
        assert rep["route"] == rep["api"]
        assert rep["same_output"]
        assert all(c["fed_in_order"] for c in rep["route"] + rep["default"]), "kept features fed out of order"
        rows = [[p for p in row if p >= 0] for c in rep["route"] for row in c["picks"]]
        if kwargs.get("compat") == "official":
            assert any(r != sorted(r) for r in rows), "the release's order should differ from ascending here"
        else:
            assert all(r == sorted(r) for r in rows)
    assert [c["picks"] for c in report[0]["route"]] != [c["picks"] for c in report[0]["default"]]

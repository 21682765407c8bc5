"""`python -m bench vllm --quick` in this environment: two engines (unpruned, keep 0.098) on the
benchmark's tiny 576-token LLaVA-1.5; the rows say what each engine served."""

import csv
import os
import subprocess
import sys

from conftest import engine_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_vllm_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "vllm", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=engine_env({}), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "vllm_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["keep"], r["visual"]) for r in rows] == [("unpruned", "1.0", "576"),
                                                                     ("otprune", "0.098", "56")]
    for r in rows:
        assert float(r["req_s"]) > 0
        assert abs(float(r["out_tok_s"]) - 8 * float(r["req_s"])) <= 1e-9 * float(r["out_tok_s"])  # 8 tokens each
        assert r["setting"] == "CPU, tiny model, shared machine"
    assert "| otprune | 0.098 | 56 |" in (tmp_path / "vllm_quick.md").read_text()

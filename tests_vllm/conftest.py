"""Shared fixtures of the vLLM plugin tests (run by `make test-vllm` in the .venv-vllm environment).

Engine starts dominate the cost (20-30 s each on 2 cores), so every engine configuration runs
once per session, in its own process (engine_run.py), two at a time, and the tests read their
results: per model (tiny LLaVA-1.5 and LLaVA-NeXT), pruning on through the environment
(OTPRUNE_KEEP), off (variables unset), and keep = 1.0 through the Python route.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import engine_run  # noqa: E402
import tiny_models  # noqa: E402

KEEP = 0.1
# config name -> (extra environment, extra engine_run.py arguments)
CONFIGS: Dict[str, Tuple[dict, list]] = {
    "env": ({"OTPRUNE_KEEP": str(KEEP)}, []),
    "off": ({}, []),
    "python_keep1": ({}, ["--enable", "1.0"]),
}
_PRUNING_VARS = ("OTPRUNE_KEEP", "BASELINE", "SUBSET_RATIO", "OTPRUNE_COMPAT", "OTPRUNE_GAMMA",
                 "OTPRUNE_NORMALIZE", "OTPRUNE_BACKEND", "OTPRUNE_LAYER", "LAYER_INDEX", "VLLM_PLUGINS")
ENGINE_TIMEOUT_S = 1200


def engine_env(extra: dict) -> dict:
    """The environment of an engine process: offline, small KV cache, pruning only as ``extra`` says."""
    env = {k: v for k, v in os.environ.items() if k not in _PRUNING_VARS}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def run_engine(checkpoint: str, out: str, extra_env: dict, extra_args: list) -> dict:
    """engine_run.py's result for one engine process (its stderr's tail in the error if it fails)."""
    cmd = [sys.executable, os.path.join(HERE, "engine_run.py"), checkpoint, out, *extra_args]
    proc = subprocess.run(cmd, env=engine_env(extra_env), capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"engine run {' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Dict[str, str]:
    """kind -> folder of a saved tiny checkpoint (random weights, seed 0)."""
    folder = str(tmp_path_factory.mktemp("ckpt"))
    return {kind: tiny_models.save_tiny(kind, folder) for kind in tiny_models.KINDS}


@pytest.fixture(scope="session")
def engine_results(checkpoints, tmp_path_factory) -> Dict[Tuple[str, str], list]:
    """(kind, config) -> engine_run.py's per-prompt results; every engine runs once, two at a time."""
    out_dir = tmp_path_factory.mktemp("runs")
    jobs = [(kind, name) for name in CONFIGS for kind in tiny_models.KINDS]

    def run(job):
        kind, name = job
        extra_env, extra_args = CONFIGS[name]
        return run_engine(checkpoints[kind], os.path.join(out_dir, f"{kind}-{name}.json"), extra_env, extra_args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, jobs))
    return dict(zip(jobs, results))


@pytest.fixture(scope="session")
def references(checkpoints):
    """kind -> transformers references per prompt: full image-token counts per image, greedy ids
    unpruned and with ``otprune.apply(model, keep=KEEP)``."""
    from reference import transformers_reference

    return {kind: transformers_reference(path, KEEP) for kind, path in checkpoints.items()}

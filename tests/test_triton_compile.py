"""Every Triton kernel compiled for sm_80 and sm_90 by Triton's real NVIDIA backend, without a GPU.

bench/triton_target.py compiles, in a fresh process per target (this suite sets TRITON_INTERPRET=1,
which must not reach the compiler), exactly the specialisations the project's wrappers ask for at
N 576 / 2880 / 1001, d 1024 / 4096 / 5120, fp16 / bf16 / fp32, both normalisations, valid masks,
ragged budgets and both kernel-row forms. Asserted: everything compiles; no stack and no spill
instruction in any kernel; shared memory within the target's opt-in limit; <= 255 registers.
This proves resources, not results or speed on a GPU (untested on GPU). Takes minutes on 2 cores
the first time (ptxas), seconds once Triton's cache holds the kernels.
"""

import os
import re

import pytest

from helpers import require_module

require_module("triton", "triton")
from bench import triton_target as tt  # noqa: E402

pytestmark = pytest.mark.slow
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")


def _launched_kernels():
    """Names of the @triton.jit kernels the wrappers launch (by convention ``*_kernel``)."""
    names = set()
    for f in os.listdir(_SRC):
        if f.endswith(".py"):
            with open(os.path.join(_SRC, f)) as fh:
                names |= set(re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", fh.read()))
    return names


@pytest.fixture(scope="module")
def rows():
    return tt.run(tt.ARCHS, timeout=1200)


def test_every_kernel_compiles_for_both_targets(rows):
    expected = _launched_kernels()
    assert len(expected) >= 5, expected
    for arch in tt.ARCHS:
        got = [r for r in rows if r["target"] == f"sm_{arch}"]
        assert {r["kernel"] for r in got} == expected
        configs = " ".join(r["config"] for r in got)
        for needed in ("MODE=0", "MODE=1", "MODE=2", "HAS_VALID=True", "HAS_VALID=False",
                       "FULL_L=True", "FULL_L=False", "SPLIT=True", "SPLIT=False", "IDENTITY=True", "IDENTITY=False"):
            assert needed in configs, f"sm_{arch}: no kernel compiled with {needed}"
        for kernel in ("_similarity_kernel", "_kernel_matrix_kernel"):  # both tile widths (N = 2880: 128)
            blocks = {m for r in got if r["kernel"] == kernel for m in re.findall(r"\bBLOCK=(\d+)", r["config"])}
            assert blocks == {"64", "128"}, (arch, kernel, blocks)


def test_no_stack_no_spills_shared_and_registers_within_limits(rows):
    bad = tt.problems(rows)
    assert not bad, "\n".join(bad)


def test_greedy_state_at_n_2880_is_spill_free(rows):
    """N = 2880 compiles the 1024-column chunk specialisation (the same one as N = 576: both are
    multiples of 16), full and lazy, with and without a mask: 4 per target, none spills."""
    greedy = [r for r in rows if r["kernel"] == "_greedy_kernel" and "BLOCK_N=1024," in r["config"]
              and "n=1001" not in r["first_case"]]
    assert sorted(r["target"] for r in greedy) == ["sm_80"] * 4 + ["sm_90"] * 4
    assert all(r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in greedy)


def test_problems_names_each_broken_rule():
    ok = dict(kernel="k", target="sm_80", config="c", first_case="x", registers=255, stack=0, local=0,
              spill_stores=0, spill_loads=0, shared=tt.SHARED_LIMIT[80] - 1024, static_shared=1024)
    assert tt.problems([ok]) == []
    assert "stack 16" in tt.problems([{**ok, "stack": 16}])[0]
    assert "spill loads" in tt.problems([{**ok, "spill_loads": 2}])[0]
    assert "shared memory" in tt.problems([{**ok, "static_shared": 1025}])[0]
    assert "shared memory" not in " ".join(tt.problems([{**ok, "target": "sm_90", "shared": 200 * 1024}]))
    assert "registers" in tt.problems([{**ok, "registers": 256}])[0]

"""otprune.vllm without vLLM installed: importing it and vLLM's plugin hook must cost nothing.

The plugin's behaviour inside vLLM is tested in tests_vllm/ (`make test-vllm`, its own venv).
"""

import importlib.util
import subprocess
import sys

import pytest

import otprune.vllm


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_import_and_unset_hook_need_no_vllm():
    code = (
        "import os, sys\n"
        "for k in ('OTPRUNE_KEEP', 'BASELINE'): os.environ.pop(k, None)\n"
        "import otprune.vllm\n"
        "otprune.vllm.register()\n"
        "assert 'vllm' not in sys.modules and 'otprune.vllm.models' not in sys.modules\n"
        "try:\n"
        "    otprune.vllm.enable(keep=0.1)\n"
        "except ImportError:\n"
        "    assert 'OTPRUNE_KEEP' not in os.environ\n"
        "else:\n"
        "    raise AssertionError('enable() without vLLM must fail')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_settings_from_the_environment():
    assert otprune.vllm.settings({}) is None
    assert otprune.vllm.settings({"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}).keep == 0.098
    s = otprune.vllm.settings({"OTPRUNE_KEEP": "0.1", "OTPRUNE_COMPAT": "official", "OTPRUNE_GAMMA": "0.02"})
    assert (s.keep, s.layer, s.select_kwargs) == (0.1, 0, {"compat": "official", "gamma": 0.02})
    with pytest.raises(ValueError, match="otprune vLLM plugin: bad pruning settings: .*layer 1"):
        otprune.vllm.settings({"OTPRUNE_KEEP": "0.1", "LAYER_INDEX": "1"})
    with pytest.raises(ValueError, match="otprune vLLM plugin: bad pruning settings: .*ratio in \\(0, 1\\]"):
        otprune.vllm.settings({"OTPRUNE_KEEP": "2.0"})

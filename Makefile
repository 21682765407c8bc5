# Fresh machine: `make demo` runs the photo demo, `make test` runs the test suite.
# Both create ./.venv and install what they need into it (CPU torch pinned, see requirements-test.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test info clean

$(VENV)/.installed: requirements-test.txt setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/otprune demo --out otprune_demo.png

# OTPRUNE_REQUIRE_EXT=1: a missing compiled extension (or nvcc) fails its tests instead of skipping
# them; OTPRUNE_REQUIRE_DEPS=1: so does a missing test dependency (llava-torch, triton, ...).
test: $(VENV)/.installed
	OTPRUNE_REQUIRE_EXT=1 OTPRUNE_REQUIRE_DEPS=1 $(PY) -m pytest -q -rs

info: $(VENV)/.installed
	$(VENV)/bin/otprune info

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) $(VLLM_VENV) build *.egg-info otprune/_C*.so otprune_demo.png

# Real clients, each in its own environment (CI runs this after `make test`): lmms-eval 0.7.3 running
# the release's evaluation command on tiny checkpoints, the built wheel in a clean venv, then the vLLM
# plugin's tests. lmms-eval is installed in one command with torch and transformers pinned (see
# requirements-clients.txt); its torchvision is a CUDA build that cannot import next to the CPU torch.
CLIENTS_VENV ?= .venv-clients

$(CLIENTS_VENV)/.installed: requirements-clients.txt setup.py
	rm -rf $(CLIENTS_VENV)
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q -r requirements-clients.txt
	$(CLIENTS_VENV)/bin/python -m pip uninstall -q -y torchvision
	$(CLIENTS_VENV)/bin/python -m pip install -q --no-deps llava-torch==1.2.2.post1
	OTPRUNE_SKIP_EXT=1 $(CLIENTS_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# test-clients = test-lmms (lmms-eval and the wheel, .venv-clients) then test-vllm (.venv-vllm).
.PHONY: test-clients test-lmms
test-clients: test-lmms
	$(MAKE) test-vllm

test-lmms: $(CLIENTS_VENV)/.installed
	$(CLIENTS_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider tests_clients

# The vLLM plugin's tests, in their own environment: vLLM's CPU build (it brings its own CPU torch
# and transformers; ~3.5 GB), otprune on top without dependencies or extension, and a test-only
# torchvision shim (tests_vllm/torchvision_shim.py). Engine starts dominate the run time.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.installed: requirements-vllm.txt setup.py tests_vllm/torchvision_shim.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	OTPRUNE_SKIP_EXT=1 $(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(VLLM_VENV)/bin/python tests_vllm/torchvision_shim.py --install
	touch $@

.PHONY: test-vllm
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q -rs -p no:cacheprovider tests_vllm

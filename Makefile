# Every target bootstraps .venv from nothing (python3.11) and reuses it afterwards.
# llama-cpp-python compiles llama.cpp from source (~13 min on 2 cores): the wheel is built once
# into a wheelhouse inside pip's cache directory and installed from there on every later run.

PY          ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
LLAMA_CPP   := 0.3.36
PIP_CACHE   := $(shell $(PY) -m pip cache dir 2>/dev/null || echo $$HOME/.cache/pip)
WHEELHOUSE  := $(PIP_CACHE)/medgemma-edge-wheels
EXTRAS      := export,dicom,demo,serve,dev
DEPS_STAMP  := $(VENV)/.deps-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
SYS_STAMP   := $(VENV)/.system-packages
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test fuzz bench bench-export lint deps wheelhouse clean

demo: $(DEPS_STAMP)
	$(BIN)/medgemma-edge demo

test: $(DEPS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the fuzz suite's long profile (25x the examples make test runs, random, with a database)
fuzz: $(DEPS_STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest tests/test_fuzz.py -q

bench: $(DEPS_STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-export: $(DEPS_STAMP)
	$(BIN)/python benchmarks/run_all.py --exports

lint: $(DEPS_STAMP)
	$(BIN)/ruff check edge export android_bridge medgemma_edge models tests benchmarks
	$(BIN)/ruff format --check edge export android_bridge medgemma_edge models tests benchmarks

deps: $(DEPS_STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# Build llama-cpp-python once; `make wheelhouse` is a no-op while the wheel is cached.
wheelhouse: $(BIN)/python
	@if ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMA_CPP): cached wheel in $(WHEELHOUSE)"; \
	else \
	  echo "llama-cpp-python $(LLAMA_CPP): building the wheel once (~13 min on 2 cores) into $(WHEELHOUSE)"; \
	  mkdir -p $(WHEELHOUSE) && $(BIN)/pip wheel --no-deps -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP); \
	fi

$(SYS_STAMP): scripts/system-packages.sh | $(BIN)/python
	sh scripts/system-packages.sh
	touch $@

$(DEPS_STAMP): pyproject.toml | $(BIN)/python $(SYS_STAMP)
	$(MAKE) --no-print-directory wheelhouse
	$(BIN)/pip install -q --find-links $(WHEELHOUSE) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.deps-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

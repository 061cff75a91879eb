# Every target bootstraps .venv from nothing (python3.11) and reuses it afterwards.
# llama-cpp-python compiles llama.cpp from source (~13 min on 2 cores): the wheel is built once
# into a wheelhouse inside pip's cache directory and installed from there on every later run.
# llama.cpp's own llama-imatrix, llama-quantize and llama-perplexity (the export's importance
# matrix and KL report) are built once the same way, from the same sdist (~4 min on 2 cores).

PY          ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
LLAMA_CPP   := 0.3.36
PIP_CACHE   := $(shell $(PY) -m pip cache dir 2>/dev/null || echo $$HOME/.cache/pip)
WHEELHOUSE  := $(PIP_CACHE)/medgemma-edge-wheels
# The wheel is built for the CPU it is built on (llama.cpp's GGML_NATIVE), so it is kept per
# instruction-set signature: a pip cache carried to another CPU builds its own wheel there
# instead of crashing with SIGILL. (llama.cpp's tools are built portable, see below.)
CPU_KEY     := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx|bmi|sse4)' | sort | tr '\n' ' ' | sha256sum | cut -c1-12)
WHEELS_CPU  := $(WHEELHOUSE)/native-$(CPU_KEY)
EXTRAS      := export,dicom,reports,openvino,archive,demo,serve,dev
DEPS_STAMP  := $(VENV)/.deps-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
SYS_STAMP   := $(VENV)/.system-packages
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test fuzz bench bench-export lint deps wheelhouse llama-tools clean

demo: $(DEPS_STAMP) llama-tools
	$(BIN)/medgemma-edge demo

test: $(DEPS_STAMP) llama-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the fuzz suite's long profile (25x the examples make test runs, random, with a database)
fuzz: $(DEPS_STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest tests/test_fuzz.py -q

bench: $(DEPS_STAMP) llama-tools
	$(BIN)/python benchmarks/run_all.py

bench-export: $(DEPS_STAMP) llama-tools
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
	@if ls $(WHEELS_CPU)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMA_CPP): cached wheel in $(WHEELS_CPU)"; \
	else \
	  echo "llama-cpp-python $(LLAMA_CPP): building the wheel once for this CPU (~13 min on 2 cores) into $(WHEELS_CPU)"; \
	  mkdir -p $(WHEELS_CPU) && $(BIN)/pip wheel --no-deps --no-binary llama-cpp-python -w $(WHEELS_CPU) llama-cpp-python==$(LLAMA_CPP); \
	fi

# llama.cpp's tools, built once per llama-cpp-python version and CPU level beside the wheel
# (LLAMA_TOOLS_CPU=native builds for this machine only); a no-op while they are cached.
llama-tools: $(BIN)/python
	@sh scripts/build-llama-tools.sh $(LLAMA_CPP) $(WHEELHOUSE) $(BIN)/python

$(SYS_STAMP): scripts/system-packages.sh | $(BIN)/python
	sh scripts/system-packages.sh
	touch $@

$(DEPS_STAMP): pyproject.toml | $(BIN)/python $(SYS_STAMP)
	$(MAKE) --no-print-directory wheelhouse
	$(BIN)/pip install -q --find-links $(WHEELS_CPU) -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory llama-tools
	rm -f $(VENV)/.deps-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# One entry point for people and CI. `make demo` and `make test` do all the set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The CPU build of torch comes first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bns demo --out bns-demo

# The suite on up to TEST_WORKERS processes, one per core (pytest-xdist), each test file whole
# in one of them (its module fixtures run once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info

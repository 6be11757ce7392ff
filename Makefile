# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
# torch is pinned to the CPU build that lies on this machine's disk; users may
# install any torch the package range admits.
INSTALL = $(PYTHON) -m pip install -q torch==2.13.0 -e ".[dev]"

.PHONY: install demo lint test bench

install:
	$(INSTALL)

demo: install
	$(PYTHON) examples/digits_demo.py

# layers import only downward (import-linter), ruff's checks, then the test suite
lint: install
	lint-imports
	ruff check permgraph tests benchmarks examples

test: lint
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) benchmarks/compile_llama7b.py

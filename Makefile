# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The environment is rebuilt when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo-output

.PHONY: env bench-env services test lint typecheck unit demo format clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[api,worker,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# the benchmarks' extra references (bench/quantus_mprt.py): never needed by the service
bench-env: env
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps quantus==0.6.0

# ruff, then the import rules of pyproject.toml's [tool.importlinter] (the engine stays a library;
# the API imports only the contract from the engine, never torch)
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo

typecheck: env
	$(BIN)/mypy

# the service tests need PostgreSQL and Redis on 127.0.0.1: started here if they are down;
# the report tests need pdftoppm and Chromium: installed here if they are missing
services:
	@bash tests/start_services.sh
	@bash tests/install_tools.sh

unit: env services
	$(BIN)/pytest

# ruff, mypy, then the whole suite; pytest's exit code 5 (no tests ran) fails like any other.
test: lint typecheck unit

# the embedded service (SQLite, artifact folder, a worker needing no broker server), a real
# audit of the bundled sample model over HTTP, the report in $(DEMO_OUT)
demo: env
	$(BIN)/python examples/demo_service.py --out $(DEMO_OUT)

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache tests/.cache

# Two commands for a newcomer: `make demo` and `make test` (see README.md).
# Both create the virtualenv on first use and start PostgreSQL / RabbitMQ if they are down.
# The otel extra is installed so that the OpenTelemetry tests run instead of skipping.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test lint unit services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,otel]'
	rm -f $(VENV)/.installed-*
	touch $@

services:
	@scripts/ensure-services

demo: $(STAMP) services
	$(BIN)/sagabox demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# Tests that stop, block or restart the shared servers (marked faults) run alone, after
# the rest, which run on two workers: each of those has its own database and vhost.
test: $(STAMP) services lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=10 -n 2 --dist worksteal -m "not faults"
	$(BIN)/pytest -q -p no:cacheprovider --durations=10 -m faults

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

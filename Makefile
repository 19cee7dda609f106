PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint clean

# The stamp is newer than pyproject.toml once the package and its dev extra are installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/lightning-plasticity fit --config recipes/quickstart.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check lightning_plasticity tests benchmarks

clean:
	rm -rf $(VENV) runs

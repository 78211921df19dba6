# Two commands on a fresh machine: `make serve` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test check format bench clean

$(STAMP): pyproject.toml examples/plugin/pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e examples/plugin
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tagrelay serve --rules $${TAGRELAY_RULES:-rules/}

test: check
	$(BIN)/pytest -q

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/tagrelay check rules/
	$(BIN)/tagrelay test rules/
	$(BIN)/tagrelay check examples/ecommerce
	$(BIN)/tagrelay test examples/ecommerce

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

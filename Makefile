# edgescreen: the two commands of the quick start are `make demo` and `make test`.
# Everything they need is installed from here, so a fresh Debian machine (Python 3.11+, root) is enough.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Versions the tests passed with; a fresh install months from now gets the same.
PIP_INSTALL := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt
# python3-venv for the virtualenv; the rest are the real peers the tests start on loopback.
DEBIAN_RUNTIME := python3-venv
DEBIAN_TEST    := $(DEBIAN_RUNTIME) dcmtk dicom3tools orthanc orthanc-dicomweb nut-server nut-client chromium \
                  fonts-dejavu-core ghostscript
DATA ?= ../shared/data/mini-mias

.PHONY: help demo test lint models evaluate bench debian-deps clean

help:
	@echo "make demo   - install, generate phantom studies, run the appliance on http://127.0.0.1:8080"
	@echo "make test   - install test dependencies (Debian packages too, as root) and run the whole suite"
	@echo "make models DATA=../shared/data/mini-mias - retrain the reference models"
	@echo "make lint   - ruff"

$(BIN)/python:
	@$(MAKE) --no-print-directory debian-deps PACKAGES="$(DEBIAN_RUNTIME)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev,optimize,train]'
	touch $@

PACKAGES ?= $(DEBIAN_TEST)
debian-deps:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (run as root or: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

demo: $(VENV)/.runtime
	$(BIN)/edgescreen --data-dir demo-data demo

test: debian-deps $(VENV)/.dev
	$(BIN)/ruff check .
	EDGESCREEN_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q -rs

lint: $(VENV)/.dev
	$(BIN)/ruff check .

# Retrain every reference model (phantoms are rendered on the fly; mini-MIAS is read from $(DATA)).
# Each trainer is sized for 20 minutes on 2 idle cores (2 torch threads; rendering uses every core).
models: $(VENV)/.dev
	$(BIN)/python -m models.train.mammo --data $(DATA) --out models/
	$(BIN)/python -m models.train.ct_stage1
	$(BIN)/python -m models.train.ct_stage2
	$(BIN)/python -m models.train.ct_stage3
	$(BIN)/edgescreen models evaluate --n 120 --stage1-n 60 --update-cards
	$(BIN)/python -m models.evaluate_e2e

bench: $(VENV)/.dev
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-data .pytest_cache .ruff_cache

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
                  fonts-dejavu-core fonts-wqy-microhei fonts-sil-abyssinica poppler-utils ghostscript postgresql \
                  systemd
# mini-MIAS (research licence) is never in the repository: its tests skip where it is absent and the run says so in
# one line; point them at a copy with EDGESCREEN_MINIMIAS=/path/to/mini-mias (or DATA=...). .ci/run, where the
# data is present, sets EDGESCREEN_REQUIRE_MINIMIAS=1 so that such a skip fails there.
DATA ?= ../shared/data/mini-mias
export EDGESCREEN_MINIMIAS ?= $(abspath $(DATA))

.PHONY: help demo test lint models evaluate bench drills fuzz audit debian-deps clean

help:
	@echo "make demo   - install, generate phantom studies, run the appliance on http://127.0.0.1:8080"
	@echo "make test   - install test dependencies (Debian packages too, as root) and run the whole suite"
	@echo "make models DATA=../shared/data/mini-mias - retrain the reference models"
	@echo "make lint   - ruff"
	@echo "make fuzz   - 10,000+ malformed inputs (DICOM over C-STORE and upload, NUT, site config)"
	@echo "make drills - crash drills: services SIGKILLed at random points, power cuts"
	@echo "make bench  - every benchmark, same-run ratios: bench/results.json and bench/REPORT.md"

$(BIN)/python:
	@$(MAKE) --no-print-directory debian-deps PACKAGES="$(DEBIAN_RUNTIME)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml setup.py constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP_INSTALL) -e '.[dev,optimize,train,cloud]'
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
	$(BIN)/python .ci/audit_deps.py
	EDGESCREEN_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q -rs

# pip-audit over constraints.txt: fails on a known vulnerability (unless .ci/audit-ignore.txt says why not),
# reports without failing when the vulnerability database cannot be reached
audit: $(VENV)/.dev
	$(BIN)/python .ci/audit_deps.py

lint: $(VENV)/.dev
	$(BIN)/ruff check .

# Retrain every reference model (phantoms are rendered on the fly; mini-MIAS is read from $(DATA)).
# Each trainer is sized for 20 minutes on 2 idle cores (2 torch threads; rendering uses every core).
models: $(VENV)/.dev
	$(BIN)/python -m edgescreen.models.train.mammo --data $(DATA) --out models/
	$(BIN)/python -m edgescreen.models.train.mammo --data $(DATA) --out models/ --contralateral
	$(BIN)/python -m edgescreen.models.train.ct_stage1
	$(BIN)/python -m edgescreen.models.train.ct_stage2
	$(BIN)/python -m edgescreen.models.train.ct_stage3
	$(BIN)/edgescreen models evaluate --n 120 --stage1-n 60 --update-cards
	$(BIN)/python -m edgescreen.models.evaluate_e2e

# Long fault drills (make test runs small samples of each).
# sync (issue 12): 1,000 cloud items exactly once through a faulty proxy to two receivers on PostgreSQL,
# the sync process SIGKILLed 20 times and a receiver killed and restarted.
drills: debian-deps $(VENV)/.dev
	SYNC_DRILL_ITEMS=1000 SYNC_DRILL_KILLS=20 SYNC_DRILL_RESTARTS=2 SYNC_DRILL_REPORT=bench/out/sync-drill.json \
	  EDGESCREEN_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q -rs -s -p no:cacheprovider --timeout 3600 \
	  tests/test_sync_drill.py
# the whole box (issue 16): dicom, worker and sync SIGKILLed at random points and power cuts, 50 kills
	EDGESCREEN_DRILL_KILLS=50 EDGESCREEN_DRILL_EXAMS=8 EDGESCREEN_DRILL_RESULTS=1 EDGESCREEN_REQUIRE_TOOLS=1 \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider --timeout 5400 tests/test_drills_box.py

# Fuzzing (issue 16): malformed DICOM through C-STORE (both receive paths) and the upload ingest, the header
# walker, the NUT client and the site config; 10,000+ cases in all, counts in bench/results.json `fuzz`.
fuzz: debian-deps $(VENV)/.dev
	EDGESCREEN_FUZZ_EXAMPLES=2000 EDGESCREEN_FUZZ_RESULTS=1 EDGESCREEN_REQUIRE_TOOLS=1 \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider --timeout 7200 tests/test_fuzz_dicom.py tests/test_fuzz_parsers.py

# Benchmarks (issue 15): every bench/bench_*.py in one run, each writing its section of bench/results.json,
# then bench/REPORT.md rendered from it (bench/run_all.py; BENCH_ARGS="--only bench_ct_study" for one).
bench: debian-deps $(VENV)/.dev
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-data .pytest_cache .ruff_cache

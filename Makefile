# The two commands of the README:
#   make run    create .venv (first time) and run the whole pipeline on the embedded default, offline,
#               then write Snakemake's HTML report (results/report.html)
#   make test   create .venv (first time) and run the test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# This machine's pip configuration names package folders that may not exist; pip warns about each.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# The default run and the tests never reach a model or dataset hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: env run test bench figures clean-results

$(STAMP): pyproject.toml requirements/catalogs.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' $(QUIET_PIP)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/catalogs.txt $(QUIET_PIP)
	touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(OFFLINE) $(VENV)/bin/snakemake --configfile config/config.yaml
	$(OFFLINE) $(VENV)/bin/snakemake --configfile config/config.yaml --report results/report.html

# The README's figures: small copies of the default run's report figures (after `make run`).
figures: $(STAMP)
	$(VENV)/bin/python -m moelang report-figures --figures results/report --out docs/figures

test: $(STAMP)
	$(OFFLINE) $(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(OFFLINE) $(VENV)/bin/python benchmarks/tokenize_overlap.py

clean-results:
	rm -rf results/* .snakemake

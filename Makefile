# The two commands of the README:
#   make run    create .venv (first time) and run the whole pipeline on the embedded default, offline,
#               then write Snakemake's HTML report (results/report.html)
#   make test   create .venv (first time) and run the test suite
# and, beyond the README's two:
#   make rehearse   both paper configs at the real models' widths on this machine (README "Paper scale,
#                   rehearsed"): stand-ins, the whole DAG, a table of each stage's wall time, memory, output
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# This machine's pip configuration names package folders that may not exist; pip warns about each.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# The default run and the tests never reach a model or dataset hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: env run test bench figures clean-results rehearse

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

# Every benchmark's full form, one after the other (two torch processes on 2 cores slow each other
# 10-80x); each writes benchmarks/results/<name>.json and its section of benchmarks/RESULTS.md. All run,
# then it fails naming those that failed. tests/test_benchmarks.py runs their quick forms (--quick).
BENCHMARKS := tokenize_overlap sharding routing_profile train_step adapt_step expand_step plan_memory fsdp_rehearsal
bench: $(STAMP)
	failed=""; for name in $(BENCHMARKS); do \
		echo "== benchmarks/$$name.py"; \
		$(OFFLINE) $(VENV)/bin/python benchmarks/$$name.py || failed="$$failed $$name"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

# Each rehearsal runs in rehearsal/<name>/ (its inputs/ are the stand-ins of the paper config, made
# once; results/ as a run's), then prints its table of jobs (rehearsal/<name>/usage.md). Depth cuts:
# OLMoE-1B-7B 2 of 16 layers (CPT's fp32 weights, gradients and AdamW moments of 1.05B parameters take
# 17 GB), Qwen1.5-1.8B 4 of 24 (stage 1 of the uniform plan trains 20 new FFN-width experts). The
# memory cap makes the rules that ask for more (evaluation, training: config.py's STAGE_RESOURCES) run
# one at a time: two Qwen-width perplexity jobs (151,936-entry logits) together exceed 24 GB.
REHEARSALS := olmoe:config/olmoe-m7.yaml:2 qwen:config/layermoe-qwen.yaml:4
rehearse: $(STAMP)
	for entry in $(REHEARSALS); do \
	    IFS=: read -r name paper layers <<< "$$entry"; \
	    mkdir -p rehearsal/$$name; \
	    ( cd rehearsal/$$name \
	      && $(OFFLINE) ../../$(VENV)/bin/python -m moelang standins --configfile ../../$$paper --layers $$layers --out inputs \
	      && $(OFFLINE) MOELANG_USAGE_DIR=results/usage ../../$(VENV)/bin/snakemake --snakefile ../../workflow/Snakefile \
	           --configfile ../$$name.yaml --resources mem_mb=20000 \
	      && ../../$(VENV)/bin/python -m moelang usage --dir results/usage --out results/usage.parquet > usage.md ); \
	    cat rehearsal/$$name/usage.md; \
	done

clean-results:
	rm -rf results/* .snakemake

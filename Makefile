# Two entry points: `make run` (default sweep on the embedded model) and `make test`.
# Both create the virtual environment from envs/ when it is missing.
#   GPU=1|0         CUDA or CPU torch (default: 1 when `nvidia-smi -L` lists a GPU)
#   TORCH_INDEX=URL an extra index for torch (PyTorch's CPU wheels on a CPU machine elsewhere: envs/torch-cpu.txt)
#   CONFIG=path     a config merged over config/config.yaml (make run); its report goes to its run folder
#   CORES=N         snakemake --cores
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
TORCH_ENV := envs/torch-$(if $(filter 1,$(GPU)),cuda,cpu).txt
TORCH_INDEX ?=
CONFIG ?=

.PHONY: run test env clean

env: $(VENV)/.installed-$(notdir $(basename $(TORCH_ENV)))

# torch (+ triton) is installed first and alone, and every later install is constrained to it, so that nothing
# replaces the chosen build. A stamp per build: switching GPU= reinstalls.
$(VENV)/.installed-%: envs/%.txt envs/requirements.txt envs/constraints.txt pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r envs/$*.txt
	$(BIN)/pip install -q -c envs/constraints.txt -c envs/$*.txt -r envs/requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: env
	$(BIN)/python -m moesweep.configfile config/config.yaml $(CONFIG)
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile=$(CONFIG))
	$(BIN)/snakemake --cores $(CORES) $(if $(CONFIG),--configfile=$(CONFIG)) \
		--report $$($(BIN)/python -m moesweep.runfolder $(CONFIG))/report.html

test: env
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf results logs benchmarks/rules .snakemake

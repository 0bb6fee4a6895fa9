# Two commands for users: `make demo` and `make test`. Both set everything up first (idempotent: a
# set-up machine skips every step in seconds). See README.md for the variables.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The torch build. The default is the pair that installs from these CPU machines' disk; on a CUDA
# cluster pick the wheel for your driver, e.g.
#   make setup TORCH_SPEC="torch==2.8.0 torchvision==0.23.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX_URL ?=
# 0 skips the apt step (no root on the machine: install the packages below by other means).
SYSTEM_DEPS ?= 1
# FFCV compiles against OpenCV and libturbojpeg; SLURM + munge run the scheduler tests; shellcheck lints
# slurm/; numactl lets DeepSpeed bind cores to ranks; dataset-fashion-mnist is the real Fashion-MNIST (70,000
# images, `clmae-prep fashion-mnist`).
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev slurmctld slurmd slurm-client munge shellcheck numactl \
	dataset-fashion-mnist
PYTEST_ARGS ?=
# Test processes (pytest-xdist). A serial run leaves half of 2 cores idle, but two workers' 2-rank runs slow
# each other about as much on 2 cores, so the default is serial; more cores gain more. tests/conftest.py
# keeps each file's tests (and the files sharing an expensive fixture) on one worker, longest first.
TEST_WORKERS ?= 1
# Machines without network (docs/cluster.md). `make wheelhouse`, on one with network, writes every wheel clmae
# needs (clmae/wheelhouse.py) to $(or $(WHEELHOUSE),wheelhouse)/, for WHEEL_PYTHON (X.Y) and WHEEL_PLATFORM (e.g.
# manylinux_2_28_x86_64), both this machine's by default; torch only with WHEEL_TORCH=1 (TORCH_SPEC, from
# TORCH_INDEX_URL). `make setup WHEELHOUSE=dir` then installs from it alone: no apt, no index, no compiler, and
# the venv sees the system's packages, so that a torch already installed (the cluster's CUDA build) is kept.
WHEELHOUSE ?=
WHEEL_PYTHON ?=
WHEEL_PLATFORM ?=
WHEEL_TORCH ?= 0

VENV_ABS := $(abspath $(VENV))
BIN := $(VENV_ABS)/bin
STAMPS := $(VENV_ABS)/.stamps
TORCH_STAMP := $(STAMPS)/torch-$(shell printf '%s %s' '$(TORCH_SPEC)' '$(TORCH_INDEX_URL)' | cksum | cut -d' ' -f1)
# DeepSpeed JIT-builds ops into this cache; one per venv so that builds are private and reused.
export TORCH_EXTENSIONS_DIR := $(VENV_ABS)/torch_extensions
# Prebuilding DeepSpeed's CUDA/C++ ops at install needs a compiler toolchain per op; JIT is enough.
export DS_BUILD_OPS := 0

.PHONY: help setup setup-offline wheelhouse system-deps demo compare-masking test lint clean

help:
	@echo "make demo             set up, then run CL-MAE end to end on the bundled digits set (2 CPU ranks)"
	@echo "make test             set up, then run ruff and the whole test suite"
	@echo "make compare-masking  set up, then none, MAE at equal epochs and at equal FLOPs, CL-MAE, 2 seeds: probes side by side"
	@echo "                      (DATASET=digits, the default, or fashion: Fashion-MNIST)"
	@echo "make setup            system packages, $(VENV), Python packages, DeepSpeed op warm-up (idempotent)"
	@echo "                      WHEELHOUSE=dir: from that wheelhouse alone, with no network (keeps an installed torch)"
	@echo "make wheelhouse       every wheel clmae needs, into wheelhouse/ (WHEEL_PYTHON, WHEEL_PLATFORM, WHEEL_TORCH=1)"
	@echo "make lint             ruff check + shellcheck"
	@echo "variables: TORCH_SPEC='$(TORCH_SPEC)' TORCH_INDEX_URL='$(TORCH_INDEX_URL)' SYSTEM_DEPS=$(SYSTEM_DEPS)"

ifeq ($(strip $(WHEELHOUSE)),)
setup: system-deps $(STAMPS)/packages $(STAMPS)/deepspeed-ops
else
setup: setup-offline
endif

system-deps:
	@if [ "$(SYSTEM_DEPS)" = 0 ]; then exit 0; fi; \
	missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo ">> installing system packages: $$missing"; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	  echo "error: need root (or sudo) to install: $$missing; or install them yourself and run with SYSTEM_DEPS=0" >&2; exit 1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$sudo apt-get update -qq; \
	$$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null

$(BIN)/python:
	@echo ">> creating $(VENV)"
	$(PYTHON) -m venv $(VENV_ABS)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(TORCH_STAMP): $(BIN)/python
	@echo ">> installing $(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH_SPEC)
	@mkdir -p $(STAMPS) && rm -f $(STAMPS)/torch-* && touch $@

$(STAMPS)/packages: setup.py $(TORCH_STAMP)
	@echo ">> installing clmae and its dependencies into $(VENV)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# DeepSpeed's first CPU init compiles a comm op (~2 min). Doing it here, with a real 2-rank
# all_reduce, keeps that cost out of timed tests and checks the distributed stack at the same time.
$(STAMPS)/deepspeed-ops: $(STAMPS)/packages
	@echo ">> warming DeepSpeed (first run compiles its CPU comm op, about 2 minutes)"
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m clmae.dist
	@touch $@

wheelhouse: system-deps $(STAMPS)/packages
	$(BIN)/python -m clmae.wheelhouse $(or $(WHEELHOUSE),wheelhouse) \
	  $(if $(WHEEL_PYTHON),--python $(WHEEL_PYTHON)) $(if $(WHEEL_PLATFORM),--platform $(WHEEL_PLATFORM)) \
	  $(if $(filter 1,$(WHEEL_TORCH)),--torch '$(TORCH_SPEC)' $(if $(TORCH_INDEX_URL),--torch-index-url $(TORCH_INDEX_URL)))

# No DeepSpeed warm-up here: on a GPU node DeepSpeed builds no CPU op, and benchmarks/gpu_check.sh checks the rest.
WHEELHOUSE_ABS = $(abspath $(WHEELHOUSE))
OFFLINE_PIP = $(BIN)/python -m pip install --quiet --no-index --find-links $(WHEELHOUSE_ABS)
setup-offline:
	@if [ ! -f "$(WHEELHOUSE_ABS)/wheelhouse.json" ]; then \
	  echo "error: WHEELHOUSE=$(WHEELHOUSE): not a wheelhouse (no wheelhouse.json); build one with 'make wheelhouse' on a machine with network" >&2; \
	  exit 2; fi
	@if [ ! -x "$(BIN)/python" ]; then \
	  echo ">> creating $(VENV) (it sees the system's packages: a torch installed there is kept)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV_ABS); fi
	@echo ">> installing clmae and its dependencies from $(WHEELHOUSE), with no network"
	$(OFFLINE_PIP) setuptools wheel
	@if ! $(BIN)/python -c 'import torch' 2>/dev/null && ! ls "$(WHEELHOUSE_ABS)"/torch-*.whl >/dev/null 2>&1; then \
	  echo "error: no torch in $(VENV) and none in $(WHEELHOUSE): load the cluster's PyTorch first (e.g. module load pytorch)," \
	    "or build the wheelhouse with WHEEL_TORCH=1" >&2; \
	  exit 2; fi
	$(OFFLINE_PIP) --no-build-isolation -e '.[dev]'
	@$(BIN)/python -c 'import clmae, deepspeed, ffcv, mlflow, timm, torch; print(f">> clmae installed, beside torch {torch.__version__} from {torch.__file__}")'

lint: setup
	$(BIN)/ruff check .
	shellcheck -x slurm/*.sh slurm/lib/*.sh benchmarks/*.sh

test: setup lint
	$(BIN)/python -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# The main job on the embedded default: digits -> CL-MAE pre-training on 2 CPU ranks -> export ->
# few-shot probes and k-NN -> mask pictures -> summary. DEMO_ARGS go to pre-training (section.key=value).
DEMO_ARGS ?=
demo: setup
	$(BIN)/python -m clmae.demo $(DEMO_ARGS)

# Four arms: no pre-training, MAE at equal epochs, MAE at equal FLOPs, CL-MAE; 2 pre-training seeds each,
# mean +- std (benchmarks/compare_masking.py; a rerun reuses what is done). DATASET=digits (29 min on 2
# idle cores) or fashion (Fashion-MNIST; results in runs/compare_masking_fashion).
# COMPARE_ARGS go to the script, e.g. COMPARE_ARGS="--epochs 2 --seeds 0 --out-dir runs/compare_masking_2ep",
# or cheaper curricula against MAE of their FLOPs: COMPARE_ARGS="--cheaper 4:1 2:0.5 --out-dir runs/compare_cheaper".
DATASET ?= digits
COMPARE_ARGS ?=
compare-masking: setup
	$(BIN)/python benchmarks/compare_masking.py --dataset $(DATASET) $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Two commands do everything on a fresh Debian machine (as root, or with sudo):
#   make quickstart   install, then run the suite's main job end to end
#   make test         install, then run the test suite
# Both are idempotent: a second run installs nothing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPRO := $(BIN)/repro
# System packages: FFCV builds against OpenCV and libjpeg-turbo (found with pkg-config); the
# tests run a real Slurm with accounting on localhost (slurm/dev/start.sh); submitit's code
# snapshot needs rsync.
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config \
	slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core rsync
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Two workers; the dev-Slurm tests share one (tests/conftest.py). PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: help install system-packages quickstart test lint clean smoke-recipes gpu-check \
	test-gpu-check-tiny

help:
	@echo "make quickstart   install everything, then run the main job"
	@echo "make test         install everything, then run the tests (pytest)"
	@echo "make lint         ruff check, and lint-imports (the layers in pyproject.toml)"
	@echo "make smoke-recipes  the --smoke of every recipe, chains stage by stage (over 1 h;"
	@echo "                    the XL chains need ~20 GB of memory and ~25 GB of disk)"
	@echo "make gpu-check    the whole GPU path on one CUDA GPU (~8 min): reports/gpu_check.md"

install: system-packages $(VENV)/.installed

# dpkg is asked every time (fast); apt-get runs only for what is missing.
system-packages:
	@missing="$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	  done)"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# torch==2.14.1 / torchvision==0.29.1 come from pyproject.toml (pinned; local wheels here).
$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,ffcv]'
	touch $@

quickstart: install
	$(REPRO) doctor
	@echo; echo "# params and FLOPs of every paper row, counted, against the papers:"
	$(REPRO) verify
	@echo; echo "# train a small ViT_C on the built-in digits through FFCV (a few minutes on CPU):"
	$(REPRO) launch recipes/quickstart.yaml
	@echo; echo "# the report: every paper row beside the runs under runs/ (here, the quickstart)"
	$(REPRO) report runs/ --out runs/report.md
	@echo; echo "report: $(CURDIR)/runs/report.md"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The --smoke of every recipe, each stage of a chain in turn (CI runs one of each kind); one
# process: two run out of memory and disk on the EarlyConv XL chains (test_recipe_smoke.py).
smoke-recipes: install
	$(BIN)/python -m pytest tests/test_recipe_smoke.py -m "every_recipe or not every_recipe"

# One prepared command for the day a GPU is at hand (benchmarks/gpu_check.py; exit 3 without
# CUDA, writing nothing).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

# Its --device cpu --tiny run alone, end to end (~3 min; `make test` includes it).
test-gpu-check-tiny: install
	$(BIN)/python -m pytest tests/test_gpu_check.py -m gpu_check_tiny

lint: install
	$(BIN)/ruff check repro tests
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

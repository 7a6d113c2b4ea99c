# Two commands on a fresh machine:  `make smoke` (the whole study, tiny model, a few minutes on CPU)
# and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA wheel. On a GPU machine pass the CUDA build,
# e.g. `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
DATA_DIR ?= ../shared/data/superglue

.PHONY: install smoke test system-deps
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Debian packages: Chromium for the MLflow UI test (never a downloaded browser); Noto fonts so the
# nearest-token figures render every script (Kannada, CJK, ...) instead of a [Script] fallback.
SYSTEM_PACKAGES := chromium fonts-noto-core fonts-noto-cjk
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null)

smoke: install
	$(PY) sweeps/all.py --smoke --data-dir $(DATA_DIR)

test: install system-deps
	PTRAY_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q

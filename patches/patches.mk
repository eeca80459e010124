# make patches-check: apply the vLLM patch series to the pinned wheel and run tests/patches on CPU.
#   1. download + sha256-check the pinned wheel (cached in ~/.cache/tqstack/wheels)
#   2. unpack it to build/vllm-$(VLLM_VERSION)/pristine, copy to .../patched and run patches/apply
#      on the copy; patches/apply --check must pass on pristine
#   3. .venv-vllm: CPU torch + vLLM's CPU-installable requirements (no vllm: tests pick a tree by
#      PYTHONPATH), then pytest tests/patches with TQ_VLLM_PRISTINE / TQ_VLLM_PATCHED set.
# Every step is stamped, so a rerun only redoes what changed (a series edit re-patches a fresh copy).
VLLM_VERSION := 0.26.0
VLLM_WHEEL := vllm-$(VLLM_VERSION)-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_WHEEL_SHA256 := adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
# An older release, only for the "refuse a vLLM that does not match the series" test.
VLLM_OLD_VERSION := 0.25.1
VLLM_OLD_WHEEL := vllm-$(VLLM_OLD_VERSION)-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_OLD_WHEEL_SHA256 := 16fc7a28df1576eb6f7ca0455026551b8f9adb674c19c66059359ef3e964bd1e

WHEEL_CACHE := $(CACHE_DIR)/wheels
VLLM_TREES := $(BUILD)/vllm-$(VLLM_VERSION)
VLLM_PRISTINE := $(VLLM_TREES)/pristine
VLLM_PATCHED := $(VLLM_TREES)/patched
VLLM_OLD_TREE := $(BUILD)/vllm-$(VLLM_OLD_VERSION)/pristine
# Override (make patches-check SERIES_DIR=...) to try a work-in-progress copy of the series.
SERIES_DIR ?= patches/vllm-$(VLLM_VERSION)
SERIES_INPUTS := $(SERIES_DIR)/series $(wildcard $(SERIES_DIR)/*.patch) patches/apply
VLLM_VENV := $(ROOT)/.venv-vllm
VLLM_VPY := $(VLLM_VENV)/bin/python
PATCHES_LOG := $(BUILD)/patches-pip.log
# Wheels are for the GPU host (python 3.12); pip download must not look at this machine's python.
PIP_DOWNLOAD_WHEEL := $(PYTHON) -m pip download -q --no-deps --only-binary=:all: \
	--python-version 3.12 --platform manylinux_2_28_x86_64 -d $(WHEEL_CACHE)

$(WHEEL_CACHE)/$(VLLM_WHEEL):
	mkdir -p $(WHEEL_CACHE)
	$(PIP_DOWNLOAD_WHEEL) vllm==$(VLLM_VERSION)

$(WHEEL_CACHE)/$(VLLM_OLD_WHEEL):
	mkdir -p $(WHEEL_CACHE)
	$(PIP_DOWNLOAD_WHEEL) vllm==$(VLLM_OLD_VERSION)

$(VLLM_PRISTINE)/.unpacked: $(WHEEL_CACHE)/$(VLLM_WHEEL) patches/unpack_wheel.py
	mkdir -p $(VLLM_TREES)
	$(PYTHON) patches/unpack_wheel.py $< $(VLLM_WHEEL_SHA256) $(VLLM_PRISTINE)
	touch $@

# Only the dist-info and __init__ of the old release are needed (the version refusal happens first).
$(VLLM_OLD_TREE)/.unpacked: $(WHEEL_CACHE)/$(VLLM_OLD_WHEEL) patches/unpack_wheel.py
	mkdir -p $(dir $(VLLM_OLD_TREE))
	$(PYTHON) patches/unpack_wheel.py $< $(VLLM_OLD_WHEEL_SHA256) $(VLLM_OLD_TREE) \
		vllm-$(VLLM_OLD_VERSION).dist-info/ vllm/__init__.py vllm/_version.py
	touch $@

# Remembers which series dir the patched tree was made from, so switching SERIES_DIR re-patches.
$(VLLM_TREES)/.series-dir: patches-force
	@mkdir -p $(@D)
	@echo '$(abspath $(SERIES_DIR))' | cmp -s - $@ || echo '$(abspath $(SERIES_DIR))' > $@

$(VLLM_PATCHED)/.applied: $(VLLM_PRISTINE)/.unpacked $(SERIES_INPUTS) $(VLLM_TREES)/.series-dir
	rm -rf $(VLLM_PATCHED)
	cp -a $(VLLM_PRISTINE) $(VLLM_PATCHED)
	rm -f $(VLLM_PATCHED)/.unpacked
	$(PYTHON) patches/apply --series $(SERIES_DIR) --check --quiet $(VLLM_PRISTINE)
	$(PYTHON) patches/apply --series $(SERIES_DIR) $(VLLM_PATCHED)
	$(PYTHON) patches/apply --series $(SERIES_DIR) --verify $(VLLM_PATCHED)
	touch $@

# Exact pins; --no-deps keeps pip from resolving anything else (e.g. a CUDA torch from PyPI).
$(VLLM_VENV)/.installed: patches/cpu-test-requirements.txt
	rm -rf $(VLLM_VENV)
	mkdir -p $(BUILD)
	$(PYTHON) -m venv $(VLLM_VENV)
	@echo "installing $(VLLM_VENV) (log: $(PATCHES_LOG))"
	$(VLLM_VPY) -m pip install --no-deps --only-binary=:all: -r $< > $(PATCHES_LOG) 2>&1 \
		|| { tail -30 $(PATCHES_LOG); exit 1; }
	$(VLLM_VPY) -m pip check >> $(PATCHES_LOG) 2>&1 || { tail -30 $(PATCHES_LOG); exit 1; }
	touch $@

.PHONY: patches-check patches-trees patches-pristine patches-force
patches-force:
# patches-pristine: just the unpacked wheel (what --refresh-hashes needs, even when the series is broken)
patches-pristine: $(VLLM_PRISTINE)/.unpacked
patches-trees: $(VLLM_PATCHED)/.applied $(VLLM_OLD_TREE)/.unpacked

patches-check: patches-trees $(VLLM_VENV)/.installed
	TQ_VLLM_PRISTINE=$(VLLM_PRISTINE) TQ_VLLM_PATCHED=$(VLLM_PATCHED) \
	TQ_VLLM_OLD_TREE=$(VLLM_OLD_TREE) TQ_VLLM_PYTHON=$(VLLM_VPY) TQ_VLLM_SERIES=$(abspath $(SERIES_DIR)) \
		$(VLLM_VPY) -m pytest -q --durations=5 tests/patches

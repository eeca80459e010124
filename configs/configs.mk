# placeholder, owned by its area
.PHONY: test-configs
test-configs: ; @echo "test-configs: not yet implemented"; exit 1

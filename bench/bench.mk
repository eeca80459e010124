# placeholder, owned by its area
.PHONY: test-bench
test-bench: ; @echo "test-bench: not yet implemented"; exit 1

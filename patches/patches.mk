# placeholder, owned by its area
.PHONY: patches-check
patches-check: ; @echo "patches-check: not yet implemented"; exit 1

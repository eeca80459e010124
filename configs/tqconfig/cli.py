"""`tqconfig` command line: list / show stacks, print capacity plans, render compose files, preflight `make up`."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import compose as compose_mod
from .errors import TqConfigError
from .loader import list_stacks, load_stack
from .planner import GIB

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)


def _stack(name: str):
    try:
        return load_stack(name)
    except TqConfigError as exc:
        err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


@app.command("list")
def list_command() -> None:
    """List stacks (the names `make up STACK=...` accepts)."""
    rows = [("STACK", "HARDWARE", "MODEL", "KV DTYPE", "CONTEXT", "TP")]
    for name in list_stacks():
        s = _stack(name)
        rows.append((name, s.hardware.name, s.model.name, s.serving.kv_cache_dtype,
                     f"{s.serving.max_model_len:,}", str(s.serving.tensor_parallel_size)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@app.command()
def show(stack: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show a stack: image, `vllm serve` command line and environment."""
    s = _stack(stack)
    info = {
        "stack": s.name, "description": s.profile.description, "hardware": s.hardware.name,
        "model": s.model.hf_id, "revision": s.model.revision, "image": s.hardware.image,
        "serve_args": s.serve_args(), "environment": s.environment(), "sources": s.source_files,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console.print(f"[bold]{s.name}[/] — {s.profile.description}", highlight=False)
    console.print(f"image: {s.hardware.image}   sources: {', '.join(s.source_files)}", highlight=False)
    console.print("vllm serve " + shlex.join(s.serve_args()), highlight=False, soft_wrap=True)
    for key, value in s.environment().items():
        console.print(f"  {key}={value}", highlight=False)


@app.command()
def plan(
    stack: str,
    kv_cache_dtype: Optional[str] = typer.Option(None, "--kv-cache-dtype", help="plan another KV dtype"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="plan another context length"),
    boundary_layers: Optional[int] = typer.Option(
        None, "--turboquant-boundary-layers",
        help="plan another boundary protection: the first/last N cache-owning full-attention layers stay bf16"),
    layers: bool = typer.Option(False, "--layers", help="also list every layer's cache dtype and why"),
    as_json: bool = typer.Option(False, "--json", help="print the CapacityPlan as JSON"),
) -> None:
    """Print the predicted KV-cache capacity of a stack."""
    s = _stack(stack)
    try:
        overrides = {} if boundary_layers is None else {"turboquant_boundary_layers": boundary_layers}
        p = s.plan(kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len, **overrides)
    except TqConfigError as exc:
        err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(p.model_dump_json(indent=2))
        raise typer.Exit(0 if p.fits else 1)
    table = Table(title=f"{s.name}: {p.kv_cache_dtype} @ {p.max_model_len:,} tokens, TP={p.tensor_parallel_size}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    rows = [
        ("GPU memory (per GPU)", gib(p.gpu_memory_bytes)),
        (f"budget at gpu_memory_utilization {p.gpu_memory_utilization}", gib(p.memory_budget_bytes)),
        ("weights (per GPU, approx.)", gib(p.weight_bytes)),
        ("activations (per GPU, est.)", gib(p.activation_bytes)),
        ("runtime overhead (per GPU, est.)", gib(p.runtime_overhead_bytes)),
        ("KV cache memory (per GPU)", gib(p.kv_cache_memory_bytes)),
        ("boundary layers per side (--turboquant-boundary-layers)", str(p.turboquant_boundary_layers)),
        ("TurboQuant layers", ", ".join(map(str, p.turboquant_layers)) or "-"),
        ("bf16 full-attention layers", ", ".join(map(str, p.bf16_full_attention_layers)) or "-"),
        ("sliding-window layers (bf16)", str(len(p.sliding_layers))),
        ("shared-KV layers (YOCO)", str(len(p.shared_kv_layers))),
        ("Gated DeltaNet layers", str(len(p.linear_attention_layers))),
        ("growing KV bytes/token (all GPUs, unpadded)", f"{p.growing_bytes_per_token_all_gpus_unpadded:,}"),
        ("growing KV bytes/token (per GPU, padded)", f"{p.growing_bytes_per_token:,.0f}"),
        ("fixed bytes/sequence (window + state, per GPU)", f"{p.fixed_bytes_per_sequence / 1e6:,.1f} MB"),
        ("page size / group size / groups", f"{p.page_bytes:,} B / {p.group_size} / {p.num_kv_cache_groups}"),
        ("page padding", f"{p.page_padding_fraction:.1%}"),
        ("KV cache tokens (window-bounded)", f"{p.kv_cache_tokens:,}"),
        (f"max concurrency @ {p.max_model_len:,}", f"{p.max_concurrency:.2f}x"),
        ("unpatched vLLM report: bytes/token", f"{p.reported_bytes_per_token:,.0f}"),
        ("unpatched vLLM report: KV cache tokens", f"{p.reported_kv_cache_tokens:,}"),
        ("fits", "[green]yes[/]" if p.fits else "[red]NO[/]"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for reason in p.reasons:
        console.print(f"- {reason}", highlight=False)
    if layers:
        detail = Table("layer", "kind", "cache", "block", "page B", "why")
        for layer in p.layers:
            detail.add_row(str(layer.index), layer.kind, layer.kv_dtype, str(layer.block_size),
                           f"{layer.page_bytes:,}", layer.reason)
        console.print(detail)
    raise typer.Exit(0 if p.fits else 1)


@app.command("render-compose")
def render_compose(check: bool = typer.Option(False, "--check", help="fail if committed files are stale")) -> None:
    """Write compose/<stack>.yaml for every stack (or check that the committed ones are current)."""
    try:
        if check:
            problems = compose_mod.stale_files()
            for problem in problems:
                err.print(f"[red]stale:[/] compose/{problem}", highlight=False)
            if problems:
                err.print("run `make compose` and commit the result")
                raise typer.Exit(1)
            console.print(f"compose files current ({len(list_stacks())} stacks)")
            return
        written = compose_mod.write_all()
    except TqConfigError as exc:
        err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    for path in written:
        console.print(f"wrote {path.relative_to(compose_mod.repo_root())}", highlight=False)
    if not written:
        console.print("compose files already current")


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


@app.command()
def preflight(
    stack: str = typer.Argument("", help="stack name"),
    env_file: Path = typer.Option(Path("compose/.env"), help="the .env docker compose will read"),
) -> None:
    """Check a stack name and the compose/.env knobs before `make up` starts anything."""
    if not stack:
        err.print(f"[red]error:[/] STACK is not set; valid stacks: {', '.join(list_stacks())}", highlight=False)
        raise typer.Exit(2)
    s = _stack(stack)
    env = _read_env(env_file)
    try:
        dtype = env.get("TQ_KV_CACHE_DTYPE") or s.serving.kv_cache_dtype
        length = int(env.get("TQ_MAX_MODEL_LEN") or s.serving.max_model_len)
        boundary = env.get("TQ_KV_BOUNDARY_LAYERS")
        overrides = {} if not boundary else {"turboquant_boundary_layers": int(boundary)}
        p = s.plan(kv_cache_dtype=dtype, max_model_len=length, **overrides)
    except ValueError as exc:
        err.print(f"[red]error:[/] {env_file}: {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    if not compose_mod.compose_path(s.name).is_file():
        err.print(f"[red]error:[/] compose/{s.name}.yaml is missing; run `make compose`")
        raise typer.Exit(2)
    if not p.fits and not env.get("TQ_MODEL"):
        err.print(f"[yellow]warning:[/] the planner predicts this does not fit: {'; '.join(p.reasons)}",
                  highlight=False)
    console.print(p.summary(), highlight=False)


if __name__ == "__main__":
    app()

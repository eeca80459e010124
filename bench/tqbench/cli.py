"""``tqbench``: run the capacity / quality / latency matrix and build its report."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def run(
    config: str = typer.Option("default", "--config", "-c", help="configs/bench/<name>.yaml or a YAML path"),
    endpoint: Optional[str] = typer.Option(None, help="already running server, e.g. http://127.0.0.1:8000"),
    model: Optional[str] = typer.Option(None, help="served model name (with --endpoint or --launch-cmd)"),
    api_key: Optional[str] = typer.Option(None, envvar="TQ_API_KEY", help="bearer token of the server"),
    stack: Optional[str] = typer.Option(None, help="configs/ stack to serve once per KV dtype"),
    launcher: str = typer.Option("auto", help="how --stack is served: auto | local | compose"),
    compose_file: Optional[Path] = typer.Option(None, help="compose file of the stack (--launcher compose)"),
    vllm_bin: Optional[str] = typer.Option(None, help="vllm executable for --launcher local"),
    vllm_python: Optional[str] = typer.Option(None, help="python with vLLM installed (runs vllm.entrypoints.cli.main)"),
    launch_cmd: Optional[str] = typer.Option(None, help="any server command with {kv_cache_dtype} {host} {port} {python}"),
    host: str = typer.Option("127.0.0.1", help="host a launched server binds"),
    port: int = typer.Option(8000, help="port a launched server binds"),
    kv: Optional[str] = typer.Option(None, help="comma-separated KV dtypes (default: the config's)"),
    parts: Optional[str] = typer.Option(None, help="comma-separated parts: capacity,quality,latency"),
    scenarios: Optional[str] = typer.Option(None, help="comma-separated latency scenario names"),
    workers: Optional[int] = typer.Option(None, help="locust worker processes (0 = single process)"),
    health_timeout: Optional[float] = typer.Option(None, help="seconds to wait for /health of a launched server"),
    run_dir: Optional[Path] = typer.Option(None, help="output directory; an existing one is resumed"),
) -> None:
    """Run the benchmark matrix (resumable) and write the report."""
    from tqconfig.bench import BenchConfigError, load_bench_config

    from tqbench.context import Endpoint
    from tqbench.runner import run_matrix, validate_part_settings
    from tqbench.servers import (EndpointTarget, ServerError, check_endpoint, command_template_target,
                                 served_cache_config, stack_target)

    chosen = [name for name, value in (("--endpoint", endpoint), ("--stack", stack), ("--launch-cmd", launch_cmd)) if value]
    if len(chosen) != 1:
        _fail(f"give exactly one target: --endpoint URL --model NAME, --stack NAME, or --launch-cmd CMD (got {chosen or 'none'})")
    try:
        bench = load_bench_config(config)
        kv_list = _split(kv)
        if endpoint and not kv_list:  # a running server serves one dtype: read it from /metrics
            served = served_cache_config(endpoint.rstrip("/")).get("cache_dtype")
            kv_list = [served] if served else ["auto"]
        bench = bench.select(kv_cache_dtypes=kv_list or None, parts=_split(parts) or None,
                             scenarios=_split(scenarios) or None)
        if workers is not None:
            if bench.latency is None:
                raise BenchConfigError("--workers needs a config with a latency section")
            bench = bench.model_copy(update={"latency": bench.latency.model_copy(update={"workers": workers})})
        try:
            validate_part_settings(bench)
        except ValueError as exc:
            raise BenchConfigError(f"{config}: {exc}") from None
        timeout = health_timeout or bench.server.health_timeout_s
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        extra = {"vllm_python": vllm_python}
        if endpoint:
            if not model:
                raise BenchConfigError("--endpoint needs --model (the served model name, see GET /v1/models)")
            target_endpoint = Endpoint(endpoint.rstrip("/"), model, api_key)
            check_endpoint(target_endpoint)
            if len(bench.kv_cache_dtypes) > 1:
                raise BenchConfigError(f"a running endpoint serves one KV dtype; pass --kv with one of "
                                       f"{bench.kv_cache_dtypes} or use --stack to launch one server per dtype")
            target = EndpointTarget(target_endpoint)
            extra.update(model=model, base_url=target_endpoint.base_url)
        elif launch_cmd:
            if not model:
                raise BenchConfigError("--launch-cmd needs --model (the name the launched server serves)")
            target = command_template_target(launch_cmd, base_url, model, host, port, timeout, api_key)
            extra.update(model=model, base_url=base_url)
            if not vllm_python:  # a command run by a python: that interpreter's vLLM is the one measured
                argv0 = target.argv_for(bench.kv_cache_dtypes[0])[0]
                if Path(argv0).name.startswith("python"):
                    extra["vllm_python"] = argv0
        else:
            target = stack_target(stack, launcher=launcher, host=host, port=port, health_timeout_s=timeout,
                                  vllm_bin=vllm_bin, python=vllm_python, compose_file=compose_file,
                                  max_model_len=bench.server.max_model_len, extra_args=bench.server.extra_args)
            extra.update(model=target.model, base_url=target.base_url, stack=stack)
    except (BenchConfigError, ServerError) as exc:
        _fail(str(exc))
    out = run_dir or Path("runs") / f"{bench.name}-{datetime.now():%Y%m%d-%H%M%S}"
    console.print(f"tqbench: {bench.name} · KV {', '.join(bench.kv_cache_dtypes)} · parts {', '.join(bench.parts)} "
                  f"· {target.description} → {out}", highlight=False)
    from tqbench.records import short_message

    result = run_matrix(bench, target, out, extra_info=extra)
    console.print(f"report: {out / 'report.md'}  (done {len(result.done)}, skipped {len(result.skipped)} finished, "
                  f"failed {len(result.failed)})", highlight=False)
    for dtype, part, error in result.failed:
        console.print(f"  [red]FAIL[/] {dtype} / {part}: {short_message(error)}", highlight=False)
    if result.interrupted:
        raise typer.Exit(130)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a tqbench run directory")) -> None:
    """Regenerate report.md, CSVs, plots and manifest.json from a run directory's raw data."""
    from tqbench.report import build_report

    try:
        path = build_report(run_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(f"report: {path}")


@app.command()
def merge(dest: Path = typer.Argument(..., help="run directory to create or extend"),
          sources: list[Path] = typer.Argument(..., help="run directories with disjoint finished cells")) -> None:
    """Merge run directories (e.g. one KV dtype per GPU) into one and regenerate its report."""
    from tqbench.merge import MergeError, merge_runs
    from tqbench.report import build_report

    try:
        result = merge_runs(dest, sources)
    except MergeError as exc:
        _fail(str(exc))
    console.print(f"merged {len(result['copied'])} finished cells into {dest}; report: {build_report(dest)}",
                  highlight=False)


@app.command("configs")
def list_configs() -> None:
    """List the bench configs in configs/bench/."""
    from tqconfig.bench import available_bench_configs, load_bench_config

    for name in available_bench_configs():
        cfg = load_bench_config(name)
        console.print(f"{name}: {', '.join(cfg.kv_cache_dtypes)} · {', '.join(cfg.parts)} — {cfg.description}",
                      highlight=False)


if __name__ == "__main__":
    app()

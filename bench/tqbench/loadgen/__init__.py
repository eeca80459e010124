"""Latency part: locust load generation per scenario -> raw per-request JSONL.

``run(ctx)`` builds exact-length prompts (shared by all KV dtypes of a run), then runs each
scenario in a separate locust process (``tqbench.loadgen.engine``) and follows its progress from
the raw files. Layout: ``raw/latency/<kv_dtype>/<scenario>/{scenario.json, requests*.jsonl, DONE}``.
Heavy imports stay inside functions: importing this package must not pull in gevent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqbench.context import CellContext
from tqbench.records import is_done, mark_done, read_jsonl
from tqbench.servers import free_port

ENGINE_MODULE = "tqbench.loadgen.engine"


class LatencyError(RuntimeError):
    pass


def _server_limits(ctx: CellContext) -> int | None:
    import httpx

    response = httpx.get(f"{ctx.endpoint.base_url}/v1/models", headers=ctx.endpoint.headers(), timeout=30)
    response.raise_for_status()
    for card in response.json().get("data", []):
        if card.get("id") == ctx.endpoint.model:
            return card.get("max_model_len")
    return None


def _healthy(ctx: CellContext) -> bool:
    import httpx

    try:
        return httpx.get(f"{ctx.endpoint.base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _count_lines(directory: Path) -> int:
    total = 0
    for path in directory.glob("requests*.jsonl"):
        with open(path, "rb") as fh:
            total += sum(1 for _ in fh)
    return total


def _engine_env() -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parents[2])  # bench/, so a plain checkout works too
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def run_scenario(ctx: CellContext, settings, scenario, prompts_file: Path, scenario_dir: Path) -> dict:
    """Run one scenario in a locust process; returns the DONE summary. Raises on failure."""
    from tqdm import tqdm

    for stale in list(scenario_dir.glob("requests*.jsonl")):  # an unfinished earlier attempt
        stale.rename(stale.with_name(f"{stale.name}.partial-{int(time.time())}"))
    spec = {
        "base_url": ctx.endpoint.base_url, "model": ctx.endpoint.model, "api_key": ctx.endpoint.api_key,
        "kv_cache_dtype": ctx.kv_cache_dtype, "scenario": scenario.model_dump(), "seed": ctx.seed,
        "prompts_file": str(prompts_file), "num_warmups": settings.num_warmups,
        # a worker without users would never finish its share of the prompts
        "workers": min(settings.workers, scenario.concurrency),
        "request_timeout_s": settings.request_timeout_s, "temperature": settings.temperature,
        "master_port": free_port(),
    }
    spec_path = scenario_dir / "scenario.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    total = scenario.num_prompts + settings.num_warmups
    with open(scenario_dir / "locust.log", "ab") as log, tqdm(
        total=total, desc=f"latency {ctx.kv_cache_dtype} {scenario.name}", unit="req", leave=False
    ) as bar:
        proc = subprocess.Popen([sys.executable, "-m", ENGINE_MODULE, str(spec_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=_engine_env())
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                bar.update(_count_lines(scenario_dir) - bar.n)
            bar.update(_count_lines(scenario_dir) - bar.n)
        except BaseException:  # Ctrl-C: stop the load generator too, keep what it wrote
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # never replace the interrupt by a timeout of our own
                proc.kill()
                proc.wait()
            raise
    if proc.returncode != 0:
        tail = (scenario_dir / "locust.log").read_text(errors="replace")[-1500:]
        raise LatencyError(f"locust process for {scenario.name} exited with {proc.returncode}:\n{tail}")
    records = [r for path in sorted(scenario_dir.glob("requests*.jsonl")) for r in read_jsonl(path)]
    measured = [r for r in records if not r.get("warmup")]
    failed = [r for r in measured if not r.get("ok")]
    if len(measured) != scenario.num_prompts:
        raise LatencyError(f"{scenario.name}: {len(measured)} of {scenario.num_prompts} requests recorded")
    if failed and not _healthy(ctx):
        raise LatencyError(f"{scenario.name}: {len(failed)} requests failed and the server no longer answers /health")
    if failed and len(failed) == len(measured):
        raise LatencyError(f"{scenario.name}: all {len(failed)} requests failed, first error: {failed[0]['error']}")
    return {"completed": len(measured) - len(failed), "failed": len(failed)}


def run(ctx: CellContext) -> None:
    """Latency part entry point (see module docstring)."""
    from tqconfig.bench import LatencySettings

    from tqbench.loadgen.prompts import ServerTokenizer, cached_prompts

    settings = LatencySettings.model_validate(ctx.settings)
    max_model_len = _server_limits(ctx)
    tokenizer = ServerTokenizer(ctx.endpoint)
    errors = []
    for scenario in settings.scenarios:
        scenario_dir = ctx.raw_dir / scenario.name
        scenario_dir.mkdir(parents=True, exist_ok=True)
        if is_done(scenario_dir):
            continue
        if max_model_len and scenario.input_len + scenario.output_len > max_model_len:
            why = (f"ISL+OSL={scenario.input_len + scenario.output_len:,} exceeds the server's max_model_len "
                   f"{max_model_len:,}")
            if scenario.when_too_long == "skip":
                (scenario_dir / "scenario.json").write_text(json.dumps(
                    {"kv_cache_dtype": ctx.kv_cache_dtype, "scenario": scenario.model_dump(), "skipped": why}, indent=1))
                mark_done(scenario_dir, {"skipped": why})
            else:
                errors.append(f"{scenario.name}: {why}")
            continue
        prompts_file = ctx.run_dir / "prompts" / f"{scenario.name}.jsonl"
        cached_prompts(prompts_file, tokenizer, scenario.input_len, scenario.num_prompts + settings.num_warmups,
                       ctx.seed)
        try:
            mark_done(scenario_dir, run_scenario(ctx, settings, scenario, prompts_file, scenario_dir))
        except LatencyError as exc:
            errors.append(str(exc))
    if errors:
        raise LatencyError("; ".join(errors))
    mark_done(ctx.raw_dir, {"scenarios": [s.name for s in settings.scenarios]})

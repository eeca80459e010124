"""The benchmark matrix: KV dtypes x parts, one server per dtype, resumable, failure-tolerant.

For each KV dtype with unfinished parts the target serves a server (already running, launched,
or compose), then each selected part runs against it. A finished cell has a DONE marker and is
skipped on rerun. A failing part, a server that does not start or dies, and Ctrl-C are appended to
``raw/failures.jsonl``; the report is generated from whatever exists in every case.
"""
from __future__ import annotations

import importlib
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tqbench.context import CellContext
from tqbench.records import append_jsonl, is_done, read_jsonl
from tqbench.report.manifest import collect_provenance, now_iso, server_version
from tqbench.servers import ServerError, Target, served_cache_config

PART_MODULES = {"latency": "tqbench.loadgen", "quality": "tqbench.quality", "capacity": "tqbench.capacity"}


@dataclass
class RunResult:
    run_dir: Path
    done: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def cell_dir(run_dir: Path, part: str, kv_cache_dtype: str) -> Path:
    return run_dir / "raw" / part / kv_cache_dtype


def record_failure(run_dir: Path, kv_cache_dtype: str, part: str, kind: str, error: str, detail: str = "") -> None:
    append_jsonl(run_dir / "raw" / "failures.jsonl", {
        "time": now_iso(), "kv_cache_dtype": kv_cache_dtype, "part": part, "kind": kind, "error": error,
        "detail": detail[-4000:],
    })


def open_failures(run_dir: Path) -> list[dict[str, Any]]:
    """Latest failure of every cell that is still not done (a rerun that succeeded clears it)."""
    latest: dict[tuple[str, str], dict] = {}
    for failure in read_jsonl(run_dir / "raw" / "failures.jsonl"):
        key = (failure["kv_cache_dtype"], failure["part"])
        if not is_done(cell_dir(run_dir, failure["part"], failure["kv_cache_dtype"])):
            latest[key] = failure
    return list(latest.values())


SETTINGS_PARSERS = {  # each part validates its own config section; errors name the bad field
    "quality": ("tqbench.quality.settings", "parse_quality_settings"),
    "capacity": ("tqbench.capacity", "parse_capacity_settings"),
    "latency": ("tqconfig.bench", "LatencySettings.model_validate"),
}


def validate_part_settings(config) -> None:
    """Fail before any server starts if a selected part's section of the bench config is invalid."""
    for part in config.parts:
        module_name, attribute = SETTINGS_PARSERS[part]
        try:
            target = importlib.import_module(module_name)
        except ImportError:
            continue  # the part itself will report that it is missing
        for name in attribute.split("."):
            target = getattr(target, name)
        try:
            target(config.part_settings(part))
        except ValueError as exc:  # pydantic ValidationError and the parts' *SettingsError are ValueErrors
            raise ValueError(f"bench config section '{part}': {exc}") from None


def _part_runner(part: str):
    module = importlib.import_module(PART_MODULES[part])
    if not hasattr(module, "run"):
        raise ImportError(f"{PART_MODULES[part]} has no run(ctx)")
    return module.run


def write_run_info(run_dir: Path, config, target: Target, extra: dict[str, Any]) -> None:
    """run.json: the first invocation's config and provenance; later invocations are appended."""
    path = run_dir / "run.json"
    invocation = {"started": now_iso(), "target": target.description, "config_name": config.name,
                  "kv_cache_dtypes": config.kv_cache_dtypes, "parts": config.parts}
    if path.exists():
        info = json.loads(path.read_text())
        info.setdefault("invocations", []).append(invocation)
    else:
        info = {"config": config.model_dump(mode="json"), "started": invocation["started"], "target": target.description,
                "provenance": collect_provenance(extra.get("vllm_python")), "invocations": [invocation], **extra}
    path.write_text(json.dumps(info, indent=1, default=str))


def _save_server_facts(run_dir: Path, kv_cache_dtype: str, base_url: str, log_path: Path | None,
                       image_digests: list[str] | None = None) -> None:
    path = run_dir / "raw" / "server" / f"{kv_cache_dtype}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cache_config = served_cache_config(base_url)
    # TurboQuant boundary protection the engine ran with (--turboquant-boundary-layers, patch 0011):
    # None when the server does not report it (an unpatched vLLM).
    boundary = cache_config.get("turboquant_boundary_layers")
    path.write_text(json.dumps({
        "kv_cache_dtype": kv_cache_dtype, "vllm_version": server_version(base_url),
        "turboquant_boundary_layers": int(boundary) if boundary and boundary.isdigit() else None,
        "kv_cache_dtype_skip_layers": cache_config.get("kv_cache_dtype_skip_layers"),
        "cache_config_info": cache_config, "server_log": str(log_path) if log_path else None,
        "image_digests": image_digests or [],
        "time": now_iso(),
    }, indent=1))


def run_matrix(config, target: Target, run_dir: Path, *, extra_info: dict[str, Any] | None = None,
               report: bool = True) -> RunResult:
    """Run every unfinished (dtype, part) cell of ``config`` against ``target``; always write the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(run_dir, config, target, extra_info or {})
    result = RunResult(run_dir)
    cells = [(dtype, part) for dtype in config.kv_cache_dtypes for part in config.parts]
    progress = tqdm(total=len(cells), desc="benchmark cells", unit="cell")
    try:
        for dtype in config.kv_cache_dtypes:
            pending = [p for p in config.parts if not is_done(cell_dir(run_dir, p, dtype))]
            for part in config.parts:
                if part not in pending:
                    result.skipped.append((dtype, part))
                    progress.update(1)
            if not pending:
                continue
            log_path = run_dir / "logs" / f"server-{dtype}.log"
            try:
                with target.serve(dtype, log_path) as handle:
                    _save_server_facts(run_dir, dtype, handle.endpoint.base_url, handle.log_path, handle.image_digests)
                    for part in pending:
                        progress.set_postfix_str(f"{dtype} / {part}")
                        ctx = CellContext(handle.endpoint, dtype, part, run_dir, settings=config.part_settings(part),
                                          seed=config.seed, server_log=handle.log_path,
                                          stack=getattr(target, "stack", None))
                        try:
                            _part_runner(part)(ctx)
                            result.done.append((dtype, part))
                        except KeyboardInterrupt:
                            raise
                        except Exception as exc:
                            error = f"{type(exc).__name__}: {exc}"
                            result.failed.append((dtype, part, error))
                            record_failure(run_dir, dtype, part, "part_error", error, traceback.format_exc())
                            if not handle.alive():
                                rest = pending[pending.index(part) + 1:]
                                for later in rest:
                                    why = f"server for {dtype} died during {part}"
                                    result.failed.append((dtype, later, why))
                                    record_failure(run_dir, dtype, later, "server_died", why)
                                progress.update(len(rest))
                                progress.update(1)
                                break
                        progress.update(1)
            except ServerError as exc:
                unfinished = [p for p in pending if (dtype, p) not in result.done
                              and not any(f[:2] == (dtype, p) for f in result.failed)]
                for part in unfinished:
                    result.failed.append((dtype, part, str(exc)))
                    record_failure(run_dir, dtype, part, "server_error", str(exc))
                progress.update(len(unfinished))
    except KeyboardInterrupt:
        result.interrupted = True
        for dtype in config.kv_cache_dtypes:
            for part in config.parts:
                if not is_done(cell_dir(run_dir, part, dtype)) and (dtype, part) not in [f[:2] for f in result.failed]:
                    record_failure(run_dir, dtype, part, "interrupted", "interrupted (Ctrl-C) before this cell finished")
    finally:
        progress.close()
        if report:
            from tqbench.report import build_report

            build_report(run_dir)
    return result

"""Run directory -> report.md (three tables + glossary), CSVs, PNG plots and manifest.json.

Everything is recomputed from the raw JSONL under ``raw/`` and the provenance in ``run.json``, so
``tqbench report RUN_DIR`` can regenerate a report at any time (also from a partial run).
"""
from __future__ import annotations

import json
import math
import numbers
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from tqbench.metrics import summarize_part
from tqbench.report.glossary import GLOSSARY
from tqbench.records import short_message
from tqbench.report.manifest import now_iso

PERF_COLUMNS = [  # (header, column, higher_is_better)
    ("Req/s", "request_throughput", True), ("OutTok/s", "output_throughput", True),
    ("TTFT", "ttft_ms_mean", False), ("TPOT", "tpot_ms_mean", False), ("ITL", "itl_ms_mean", False),
    ("p90 TTFT", "ttft_ms_p90", False), ("p90 TPOT", "tpot_ms_p90", False), ("p99 TTFT", "ttft_ms_p99", False),
]


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, (list, dict)):
        return str(value)
    try:
        if value is None or pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1000 else f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: Any, base: Any) -> str:
    try:
        value, base = float(value), float(base)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "–"
    return f"{value / base:.2f}×"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _baseline(run_info: dict, dtypes: list[str]) -> str | None:
    config = run_info.get("config", {})
    wanted = config.get("baseline") or (config.get("kv_cache_dtypes") or [None])[0]
    return wanted if wanted in dtypes else (dtypes[0] if dtypes else None)


def _dtype_order(run_info: dict, *frames: pd.DataFrame | None) -> list[str]:
    order = list((run_info.get("config") or {}).get("kv_cache_dtypes", []))
    for frame in frames:
        if frame is not None:
            order += [d for d in frame["kv_cache_dtype"].astype(str) if d not in order]
    return list(dict.fromkeys(order))


def _failure_note(failures: list[dict], part: str) -> str:
    lines = [f"- **FAIL** `{f['kv_cache_dtype']}`: {short_message(f['error'])}" for f in failures if f["part"] == part]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def _dash_notes(notes: list[str]) -> str:
    """Why cells show "–" (each reason once)."""
    notes = list(dict.fromkeys(n for n in notes if n))
    return ("\n" + "\n".join(f"- “–” {n}" for n in notes) + "\n") if notes else ""


def capacity_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict],
                     skipped: pd.DataFrame | None = None) -> str:
    out = ["## 1. KV-CACHE COMPRESSION", ""]
    if frame is None:
        out.append(f"_No capacity data: {why}._")
        out.append(_failure_note(failures, "capacity"))
        return "\n".join(out)
    per_dtype = frame.drop_duplicates("kv_cache_dtype")
    dtypes = list(per_dtype["kv_cache_dtype"])
    base = _baseline(run_info, dtypes)
    compare = len(dtypes) > 1
    base_row = per_dtype[per_dtype["kv_cache_dtype"] == base].iloc[0] if base in dtypes else None
    notes: list[str] = []
    rows = []
    for _, r in per_dtype.iterrows():
        row = [f"`{r['kv_cache_dtype']}`", _fmt(r.get("kv_cache_tokens"))]
        if compare:
            row.append(_ratio(r.get("kv_cache_tokens"), base_row.get("kv_cache_tokens") if base_row is not None else None))
        row += [_fmt(r.get("max_concurrency")), _fmt(r.get("max_model_len")), _fmt(r.get("predicted_kv_tokens")),
                _ratio(r.get("kv_cache_tokens"), r.get("predicted_kv_tokens"))]
        rows.append(row)
        if pd.isna(r.get("predicted_kv_tokens")):
            note = str(r.get("planner_note") or "no planner record")
            notes.append(f"in Predicted tokens and measured/predicted (`{r['kv_cache_dtype']}`): {note}.")
        if pd.isna(r.get("max_concurrency")):
            notes.append("in Max concurrency: the server log with its “Maximum concurrency” line was not available.")
    headers = ["KV dtype", "KV cache tokens"] + ([f"vs {base}"] if compare else []) + [
        "Max concurrency", "max_model_len", "Predicted tokens", "measured/predicted"]
    out.append(_table(headers, rows))
    if not compare:
        out.append(f"\nOne KV dtype measured (`{dtypes[0]}`): no ratio column.")

    probed = frame[frame["probe_context_len"].notna()]
    out += ["", "**Admission probe** — largest N concurrent requests of L tokens served at once with no "
            "preemption (refused: the smallest N that was not):", ""]
    if probed.empty:
        out.append("_The admission probe did not run (capacity.probe: false, or it failed; see below)._")
    else:
        lengths = sorted({int(v) for v in probed["probe_context_len"]})
        rows = []
        for dtype in dtypes:
            row = [f"`{dtype}`"]
            for length in lengths:
                hit = probed[(probed["kv_cache_dtype"] == dtype) & (probed["probe_context_len"] == length)]
                if hit.empty:
                    row.append("–")
                    notes.append(f"in the admission table (`{dtype}` @ {length:,}): that length was not probed for "
                                 "this dtype (see the skipped lengths and failures).")
                    continue
                h = hit.iloc[0]
                refused = "" if pd.isna(h["refused_min"]) else f" (refused {int(h['refused_min'])})"
                row.append(f"{int(h['admitted_max'])}{refused} · {_fmt(h['admitted_tokens'])} tok")
            rows.append(row)
        out.append(_table(["KV dtype"] + [f"L = {n:,}" for n in lengths], rows))
        out.append("\nEach cell: admitted N (refused N) · KV tokens the admitted requests held (N × L). A cell "
                   "without “refused” hit the probe's upper bound (capacity.probe_max_concurrency) or ran out "
                   "of steps; the server's max_num_seqs also caps N.")
    if skipped is not None and len(skipped):
        out.append("\nProbe lengths not run: " + "; ".join(
            f"`{r['kv_cache_dtype']}` L={r['context_len']}: {r['reason']}" for _, r in skipped.iterrows()) + ".")
    out.append(_dash_notes(notes))
    out.append(_failure_note(failures, "capacity"))
    return "\n".join(out)


def quality_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict]) -> str:
    out = ["## 2. QUALITY (PPL / NIAH pass@total / GSM8K exact-match)", ""]
    if (run_info.get("part_models") or {}).get("quality"):  # merged run: quality served by another model
        out += [f"Model for this section: `{run_info['part_models']['quality']}` (not `{run_info.get('model')}`).", ""]
    if frame is None:
        out.append(f"_No quality data: {why}._")
    else:
        dtypes = list(dict.fromkeys(frame["kv_cache_dtype"].astype(str)))
        base = _baseline(run_info, dtypes)
        compare = len(dtypes) > 1
        metrics = list(dict.fromkeys(zip(frame["task"], frame["metric"])))
        lookup = {(r["kv_cache_dtype"], r["task"], r["metric"]): r for _, r in frame.iterrows()}
        headers = ["KV dtype"]
        for task, metric in metrics:
            headers += [f"{task} {metric}"] + (["Δ vs base"] if compare else [])
        rows = []
        notes = []
        for dtype in dtypes:
            row = [f"`{dtype}`"]
            for task, metric in metrics:
                r, b = lookup.get((dtype, task, metric)), lookup.get((base, task, metric))
                if r is None:
                    row += ["–", "–"] if compare else ["–"]
                    notes.append(f"`{dtype}` {task}: this task has no finished records for the dtype "
                                 "(see the failures below).")
                    continue
                cell = _fmt(r["value"], 4) + (f" ± {_fmt(r['stderr'], 4)}" if pd.notna(r.get("stderr")) else "")
                n = r.get("n")
                cell += f" (n={int(n)})" if pd.notna(n) else ""
                if compare:
                    delta = "–" if b is None else f"{float(r['value']) - float(b['value']):+.4f}"
                    row += [cell, delta]
                    if b is None:
                        notes.append(f"in Δ vs base ({task}): the baseline `{base}` has no value to compare with.")
                else:
                    row.append(cell)
            rows.append(row)
        out.append(_table(headers, rows))
        out.append("\nValues ± standard error; 95 % intervals are in `quality.csv` (ci_low, ci_high)."
                   + ("" if compare else f" One KV dtype measured (`{dtypes[0]}`): no Δ columns."))
        out.append(_dash_notes(notes))
    out.append(_failure_note(failures, "quality"))
    return "\n".join(out)


def _prompts_are_text(prompts_file: Path | None) -> bool | None:
    if prompts_file is None or not prompts_file.exists():
        return None
    return all(isinstance(json.loads(line)["prompt"], str)
               for line in prompts_file.read_text().splitlines() if line.strip())


def bench_serve_command(row: pd.Series, run_info: dict, prompts_file: Path | None = None) -> str:
    """The ``vllm bench serve`` command that sends the same requests as this scenario.

    The scenario's prompts (essay text cut to exact token counts, measured ones first) are in the run
    directory's ``prompts/<scenario>.jsonl``: the ``custom`` dataset replays them in order with no chat
    template. Only when some prompt had to be sent as token ids does it fall back to random prompts
    of the same lengths."""
    config = run_info.get("config") or {}
    argv = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", run_info.get("base_url") or "http://127.0.0.1:8000",
            "--endpoint", "/v1/completions", "--model", run_info.get("model") or "MODEL"]
    if _prompts_are_text(prompts_file) is False:
        argv += ["--dataset-name", "random", "--random-input-len", str(row["input_len"]),
                 "--random-output-len", str(row["output_len"])]
    else:
        argv += ["--dataset-name", "custom", "--dataset-path", f"prompts/{row['scenario']}.jsonl", "--disable-shuffle",
                 "--skip-chat-template", "--custom-output-len", str(row["output_len"])]
    argv += ["--num-prompts", str(row["num_prompts"]), "--max-concurrency", str(row["concurrency"]),
             "--request-rate", "inf" if math.isinf(row["request_rate"]) else str(row["request_rate"]),
             "--burstiness", str(row.get("burstiness", 1.0)), "--ignore-eos",
             "--seed", str(config.get("seed", 0)),
             "--num-warmups", str((config.get("latency") or {}).get("num_warmups", 0)),
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    return shlex.join(argv)


PHASE_COLUMNS = [  # (header, column)
    ("decode TPOT p50 ms", "decode_tpot_ms_p50"), ("decode TPOT p90 ms", "decode_tpot_ms_p90"),
    ("decode tok/s per user p50", "decode_tok_s_per_user_p50"), ("n decode", "decode_requests"),
    ("prefill tok/s", "prefill_tok_s"), ("TTFT per 1K prompt tok p50 ms", "ttft_per_1k_ms_p50"),
]


def latency_section(frame: pd.DataFrame | None, why: str | None, run_info: dict, failures: list[dict],
                    skipped: pd.DataFrame | None = None, run_dir: Path | None = None) -> str:
    out = ["## 3. PERFORMANCE", ""]
    skip_note = ""
    if skipped is not None and len(skipped):
        skip_note = "\nScenarios not run: " + "; ".join(
            f"`{r['kv_cache_dtype']}` {r['scenario']}: {r['reason']}" for _, r in skipped.iterrows()) + "."
    if frame is None:
        out.append(f"_No latency data: {why}._")
        out.append(skip_note)
        out.append(_failure_note(failures, "latency"))
        return "\n".join(out)
    dtypes = list(dict.fromkeys(frame["kv_cache_dtype"]))
    base = _baseline(run_info, dtypes)
    compare = len(dtypes) > 1
    out.append("Latencies in ms (mean unless marked). ITL/tok = token-accurate ITL (see glossary). "
               + (f"Ratio columns divide by `{base}`." if compare else
                  f"One KV dtype measured (`{dtypes[0]}`): no ratio columns.") + "\n")
    notes: list[str] = []
    for scenario in dict.fromkeys(frame["scenario"]):
        part = frame[frame["scenario"] == scenario]
        first = part.iloc[0]
        rate = "" if math.isinf(first["request_rate"]) else f", rate={first['request_rate']:g}/s, burstiness={first['burstiness']:g}"
        out.append(f"--- {scenario} (ISL={first['input_len']}, OSL={first['output_len']}, N={first['num_prompts']}, "
                   f"C={first['concurrency']}{rate}) ---\n")
        base_rows = part[part["kv_cache_dtype"] == base]
        base_row = base_rows.iloc[0] if len(base_rows) else None
        rows = []
        for _, r in part.iterrows():
            row = [f"`{r['kv_cache_dtype']}`"] + [_fmt(r[c]) for _, c, _ in PERF_COLUMNS]
            row += [_fmt(r["itl_token_ms_mean"]), f"{r['completed']}/{r['completed'] + r['failed']}"]
            if compare:
                row += [_ratio(r["output_throughput"], None if base_row is None else base_row["output_throughput"]),
                        _ratio(r["tpot_ms_mean"], None if base_row is None else base_row["tpot_ms_mean"]),
                        _ratio(r["ttft_ms_mean"], None if base_row is None else base_row["ttft_ms_mean"])]
                if base_row is None:
                    notes.append(f"in the ratio columns of {scenario}: the baseline `{base}` has no result for it.")
            rows.append(row)
            if pd.isna(r["tpot_ms_mean"]):
                notes.append(f"in TPOT/ITL of {scenario}: requests of one output token have no time per output token.")
        headers = ["KV dtype"] + [h for h, _, _ in PERF_COLUMNS] + ["ITL/tok", "ok/total"]
        if compare:
            headers += ["OutTok/s vs base", "TPOT vs base", "TTFT vs base"]
        out.append(_table(headers, rows))
        prompts_file = run_dir / "prompts" / f"{scenario}.jsonl" if run_dir is not None else None
        out.append(f"\nReproduce with (from the run directory): `{bench_serve_command(first, run_info, prompts_file)}`\n")
    if all(c in frame for _, c in PHASE_COLUMNS):
        out += ["**Decode vs prefill** — decode TPOT counts only token gaps with no prefill in flight (with all "
                "requests sent together: the steps after the last prefill ended); prefill tok/s = prompt tokens / "
                "time with a prefill in flight (see glossary).", ""]
        rows = []
        for _, r in frame.iterrows():
            rows.append([r["scenario"], f"`{r['kv_cache_dtype']}`", *[_fmt(r[c]) for _, c in PHASE_COLUMNS]])
            if pd.isna(r["decode_tpot_ms_p50"]):
                notes.append(f"in decode TPOT of {r['scenario']}: every decode step overlapped some request's "
                             "prefill (sustained arrivals), so no clean decode step was measured.")
        out.append(_table(["Scenario", "KV dtype", *[h for h, _ in PHASE_COLUMNS]], rows))
    out.append(skip_note)
    out.append(_not_measured_note(frame, skipped, run_info, run_dir))
    out.append(_dash_notes(notes))
    out.append(_failure_note(failures, "latency"))
    return "\n".join(out)


def _not_measured_note(frame: pd.DataFrame, skipped: pd.DataFrame | None, run_info: dict, run_dir: Path | None) -> str:
    """The planned (dtype, scenario) cells with no result and no recorded skip: a run assembled from parts
    (or cut short) says which holes it has instead of leaving them to be noticed. The plan is run.json's
    ``planned`` (written when parts measured apart are assembled) or else the run's config."""
    config = run_info.get("config") or {}
    planned = run_info.get("planned") or {
        "kv_cache_dtypes": config.get("kv_cache_dtypes", []),
        "latency_scenarios": [s["name"] for s in (config.get("latency") or {}).get("scenarios", [])]}
    done = set(zip(frame["kv_cache_dtype"], frame["scenario"]))
    if skipped is not None and len(skipped):
        done |= set(zip(skipped["kv_cache_dtype"], skipped["scenario"]))
    missing = []
    for dtype in planned["kv_cache_dtypes"]:
        holes = [s for s in planned["latency_scenarios"] if (dtype, s) not in done]
        if holes:
            whole = len(holes) == len(planned["latency_scenarios"]) > 1
            missing.append(f"`{dtype}`: " + (f"all {len(holes)} scenarios" if whole else ", ".join(holes)))
    if not missing:
        return ""
    why = (" (`session-skips.jsonl` records the steps a GPU session had no time for)"
           if run_dir is not None and (run_dir / "session-skips.jsonl").exists() else "")
    return f"\nNot measured in this run{why}: " + "; ".join(missing) + "."


def target_line(target: str, dtypes: list[str]) -> str:
    """The target with its ``{kv_cache_dtype}`` placeholder filled in (or said what it stands for)."""
    for placeholder in ("'<kv_cache_dtype>'", "<kv_cache_dtype>", "{kv_cache_dtype}"):
        if placeholder in target:
            if len(dtypes) == 1:
                return target.replace(placeholder, dtypes[0])
            return target.replace(placeholder, "{kv_cache_dtype}") + (
                f" — one server per KV dtype, {{kv_cache_dtype}} = {', '.join(dtypes)}" if dtypes else "")
    return target


def measured_build(provenance: dict, servers: dict[str, dict]) -> str:
    """Which vLLM answered: the server's /version, and the package behind it when the run could inspect it."""
    versions = sorted({s.get("vllm_version") for s in servers.values() if s.get("vllm_version")})
    answered = f"server /version {', '.join(versions)}" if versions else "server /version not answered"
    build = provenance.get("vllm_build") or {}
    series = provenance.get("patch_series") or {}
    if build.get("distribution"):
        what = f"`{build['distribution']}` {build.get('version')}"
        if build.get("patched"):
            return f"{what} with the tqstack patch series {str(series.get('series_sha256'))[:12]} ({answered})"
        return f"{what}, unpatched: no tqstack patch marker in the package ({answered})"
    if provenance.get("image_digest"):
        return f"the tqstack image {provenance['image_digest']} ({answered})"
    return (f"{answered}; the server's package was not inspected (an endpoint), so whether it carries the tqstack "
            f"patches is unknown (this checkout's series: {str(series.get('series_sha256'))[:12]})")


def _manifest(run_dir: Path, run_info: dict, frames: dict[str, pd.DataFrame | None]) -> dict[str, Any]:
    servers = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "raw" / "server").glob("*.json"))}
    versions = sorted({s.get("vllm_version") for s in servers.values() if s.get("vllm_version")})
    digests = sorted({d for s in servers.values() for d in s.get("image_digests") or []})
    return {
        "generated": now_iso(),
        "started": run_info.get("started"),
        "model": run_info.get("model"),
        "target": run_info.get("target"),
        "stack": run_info.get("stack"),
        "vllm_version": versions[0] if len(versions) == 1 else versions or None,
        **(run_info.get("provenance") or {}),
        "image_digest": (run_info.get("provenance") or {}).get("image_digest") or (digests[0] if len(digests) == 1
                                                                                    else digests or None),
        "servers": servers,
        "config": run_info.get("config"),
        "invocations": run_info.get("invocations", []),
        "rows": {part: (0 if frame is None else len(frame)) for part, frame in frames.items()},
    }


def build_report(run_dir: Path) -> Path:
    """Regenerate every report artefact of ``run_dir`` from its raw data; returns report.md."""
    from tqbench.report import plots
    from tqbench.runner import open_failures

    run_dir = Path(run_dir)
    if not (run_dir / "raw").exists() and not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a tqbench run directory (no raw/ or run.json)")
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    failures = open_failures(run_dir)
    capacity, capacity_why = summarize_part("capacity", run_dir)
    quality, quality_why = summarize_part("quality", run_dir)
    latency, latency_why = summarize_part("latency", run_dir)
    order = _dtype_order(run_info, capacity, quality, latency)
    if latency is not None:  # scenarios in config order, not directory order
        known = [s["name"] for s in ((run_info.get("config") or {}).get("latency") or {}).get("scenarios", [])]
        rank = {name: i for i, name in enumerate(known + [n for n in latency["scenario"] if n not in known])}
        latency = latency.sort_values("scenario", key=lambda col: col.map(rank), kind="stable")
    for name, frame in (("capacity", capacity), ("quality", quality), ("latency", latency)):
        if frame is not None:
            frame = frame.assign(_order=frame["kv_cache_dtype"].map({d: i for i, d in enumerate(order)}))
            frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
            frame.to_csv(run_dir / f"{name}.csv", index=False)
            if name == "capacity":
                capacity = frame
            elif name == "quality":
                quality = frame
            else:
                latency = frame
        elif (run_dir / f"{name}.csv").exists():
            (run_dir / f"{name}.csv").unlink()
    niah_grid, _ = summarize_part("quality", run_dir, "summarize_niah_grid")
    if niah_grid is not None:
        niah_grid.to_csv(run_dir / "niah_grid.csv", index=False)

    plot_notes = []
    for name, frame, draw in (("capacity", capacity, plots.capacity_plot), ("quality", quality, plots.quality_plot),
                              ("latency", latency, plots.latency_plot)):
        if frame is not None:
            try:
                draw(frame, run_dir / f"{name}.png")
                plot_notes.append(f"![{name}]({name}.png)")
            except Exception as exc:  # a plot must never cost the tables
                plot_notes.append(f"_{name} plot failed: {type(exc).__name__}: {exc}_")

    config = run_info.get("config") or {}
    provenance = run_info.get("provenance") or {}
    servers = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "raw" / "server").glob("*.json"))}
    dtype_line = (f"- KV dtypes: {', '.join(order)}; baseline: `{_baseline(run_info, order)}`" if len(order) > 1 else
                  f"- KV dtype: `{order[0]}` only — one dtype measured, so the report has no ratio or Δ columns"
                  if order else "- KV dtypes: none measured")
    head = [
        f"# tqbench report: {config.get('name', '?')} — {run_info.get('model', '?')}",
        "",
        f"- target: {target_line(run_info.get('target', '?'), order)}",
        f"- vLLM measured: {measured_build(provenance, servers)}",
        f"- started: {run_info.get('started', '?')}; report generated: {now_iso()}",
        f"- tqstack commit: {(provenance.get('tqstack') or {}).get('commit')}",
        f"- GPUs: {', '.join(g.get('name') or '?' for g in provenance.get('gpus') or []) or 'none detected on the client'}",
        dtype_line,
        "",
    ]
    if failures:
        head += ["**Unfinished cells** (see raw/failures.jsonl; rerun the same command to resume):", ""]
        head += [f"- `{f['kv_cache_dtype']}` / {f['part']}: {f['kind']} — {short_message(f['error'])}"
                 for f in failures]
        head.append("")
    capacity_skipped, _ = summarize_part("capacity", run_dir, "skipped")
    latency_skipped, _ = summarize_part("latency", run_dir, "skipped")
    body = [
        capacity_section(capacity, capacity_why, run_info, failures, capacity_skipped),
        quality_section(quality, quality_why, run_info, failures),
        latency_section(latency, latency_why, run_info, failures, latency_skipped, run_dir),
        "## Plots\n\n" + ("\n\n".join(plot_notes) if plot_notes else "_No data to plot._"),
        "## Glossary\n\n" + GLOSSARY,
    ]
    report = run_dir / "report.md"
    report.write_text("\n".join(head) + "\n" + "\n\n".join(body) + "\n")
    manifest = _manifest(run_dir, run_info, {"capacity": capacity, "quality": quality, "latency": latency})
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return report

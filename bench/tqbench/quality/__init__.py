"""Quality part: GSM8K exact match (lm-eval gsm8k scoring), needle in a haystack, perplexity.

``run(ctx)`` writes one raw JSONL per task under ``ctx.raw_dir`` (a record per question / probe /
window, appended as it arrives, so a rerun continues where it stopped) and marks the cell done.
``tqbench.metrics.quality.summarize`` turns the raw records into the quality table.
"""
from __future__ import annotations

from tqbench.context import CellContext
from tqbench.quality import gsm8k, niah, perplexity
from tqbench.quality.client import ServerClient
from tqbench.quality.settings import QualitySettings, QualitySettingsError, parse_quality_settings
from tqbench.records import mark_done

__all__ = ["run", "parse_quality_settings", "QualitySettings", "QualitySettingsError"]


def run(ctx: CellContext) -> None:
    settings = parse_quality_settings(ctx.settings)
    summary: dict = {"kv_cache_dtype": ctx.kv_cache_dtype, "tasks": list(settings.tasks)}
    failed: list[str] = []
    with ServerClient(ctx.endpoint, timeout_s=settings.request_timeout_s) as client:
        max_model_len = client.max_model_len()
        for task in settings.tasks:
            # One task failing (e.g. no GSM8K download) must not cost the others their results.
            try:
                if task == "gsm8k":
                    summary.update(gsm8k.run(client, ctx.raw_dir, settings.gsm8k, ctx.seed))
                elif task == "niah":
                    summary.update(niah.run(client, ctx.raw_dir, settings.niah, ctx.seed, max_model_len))
                elif task == "perplexity":
                    summary.update(perplexity.run(client, ctx.raw_dir, settings.perplexity, ctx.seed, max_model_len))
            except Exception as exc:
                failed.append(f"{task}: {type(exc).__name__}: {exc}")
    if failed:  # the cell stays unfinished; a rerun resumes each task from its raw records
        raise RuntimeError("quality tasks failed — " + " | ".join(failed))
    mark_done(ctx.raw_dir, summary)

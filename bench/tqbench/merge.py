"""Merge tqbench run directories that measured disjoint cells (e.g. one KV dtype per GPU, in parallel)
into one run directory, so that ``tqbench report`` builds one report from all of them.

Copied from each source: finished cells ``raw/<part>/<dtype>/`` (latency per scenario:
``raw/latency/<dtype>/<scenario>/`` with its DONE marker), ``raw/server/<dtype>.json``, the lines of
``raw/failures.jsonl``, ``prompts/`` and ``logs/`` (a name already taken gets the source's folder name
as prefix). ``run.json`` keeps the first source's config and provenance; every source's invocations are
appended, and a source whose model differs from the first is recorded per part in ``part_models``
(e.g. quality measured on a small real model beside latency on dummy weights). A cell finished in two
sources is an error naming it: the merge never picks one measurement over another silently.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tqbench.records import DONE_MARKER, append_jsonl, is_done, read_jsonl


class MergeError(ValueError):
    pass


def _finished_units(source: Path) -> list[Path]:
    """Relative paths of the finished measurement folders of one run directory."""
    units = []
    for cell in sorted((source / "raw").glob("*/*")):
        if not cell.is_dir() or cell.parent.name == "server":
            continue
        if cell.parent.name == "latency":
            units += [s.relative_to(source) for s in sorted(cell.iterdir()) if s.is_dir() and is_done(s)]
        elif is_done(cell):
            units.append(cell.relative_to(source))
    return units


def merge_runs(dest: Path, sources: list[Path]) -> dict[str, Any]:
    """Merge ``sources`` into ``dest`` (created if missing); returns what was copied."""
    dest = Path(dest)
    if not sources:
        raise MergeError("merge needs at least one source run directory")
    for source in sources:
        if not (Path(source) / "run.json").exists():
            raise MergeError(f"{source}: not a tqbench run directory (no run.json)")
    copied: list[str] = []
    seen = {str(u) for u in _finished_units(dest)} if dest.exists() else set()
    for source in map(Path, sources):
        for unit in _finished_units(source):
            if str(unit) in seen:
                raise MergeError(f"{unit} is finished in {source} and in an earlier source or {dest}")
            shutil.copytree(source / unit, dest / unit)
            seen.add(str(unit))
            copied.append(str(unit))
        for cell in sorted((source / "raw" / "latency").glob("*/" + DONE_MARKER)):
            target = dest / cell.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # the latency cell is done once its scenarios are (see report)
                shutil.copyfile(cell, target)
        for facts in sorted((source / "raw" / "server").glob("*.json")):
            target = dest / "raw" / "server" / facts.name
            if target.exists() and target.read_bytes() != facts.read_bytes():
                target = target.with_name(f"{facts.stem}.{source.name}.json")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(facts, target)
        for failure in read_jsonl(source / "raw" / "failures.jsonl"):
            append_jsonl(dest / "raw" / "failures.jsonl", {**failure, "merged_from": source.name})
        for folder in ("prompts", "logs"):
            for path in sorted((source / folder).glob("*")) if (source / folder).is_dir() else []:
                target = dest / folder / path.name
                if target.exists() and target.read_bytes() != path.read_bytes():
                    target = dest / folder / f"{source.name}-{path.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    shutil.copyfile(path, target)
        _merge_run_info(dest, source)
    return {"dest": str(dest), "copied": copied}


def _merge_run_info(dest: Path, source: Path) -> None:
    info = json.loads((source / "run.json").read_text())
    path = dest / "run.json"
    if not path.exists():
        info["merged_from"] = [source.name]
        path.write_text(json.dumps(info, indent=1, default=str))
        return
    merged = json.loads(path.read_text())
    merged.setdefault("merged_from", []).append(source.name)
    merged.setdefault("invocations", []).extend(
        {**inv, "target": inv.get("target") or info.get("target"), "model": info.get("model")}
        for inv in info.get("invocations", []))
    config = merged.setdefault("config", {})
    for dtype in (info.get("config") or {}).get("kv_cache_dtypes", []):
        if dtype not in config.setdefault("kv_cache_dtypes", []):
            config["kv_cache_dtypes"].append(dtype)
    for part in (info.get("config") or {}).get("parts", []):
        if part not in config.setdefault("parts", []):
            config["parts"].append(part)
        if part not in config and part in (info.get("config") or {}):
            config[part] = info["config"][part]  # this part's settings as the source ran them
    if info.get("model") and info.get("model") != merged.get("model"):
        for part in (info.get("config") or {}).get("parts", []):
            merged.setdefault("part_models", {})[part] = info["model"]
    path.write_text(json.dumps(merged, indent=1, default=str))

#!/usr/bin/env python3
"""Assemble the slices of the complete GPU run (bench_session.py --slice) into one run directory per model.

Each slice is one GPU-host run's ``bench-run.tar.gz``: a tqbench run directory with some cells of one model
(a KV dtype's scenarios, or its capacity and quality), plus ``vllm-bench/`` results and the harness's later
repeats (``fidelity-reps/``). Slices arrive over several sessions; each is added to DEST as it comes:

    python3 tests/gpu/bench/assemble.py bench/results/<date>-h200-<model> OUT1/bench-run.tar.gz [OUT2/... ...]

Cells are merged with ``tqbench merge`` (a cell finished in two slices is an error naming it, never a silent
choice), ``vllm-bench/`` and ``fidelity-reps/`` files are added (the same file name with other content is an
error too), ``session-skips.jsonl`` lines are kept with the slice they came from, run.json records the whole
matrix (``planned``, so the report lists the cells no slice measured yet), then the report and
``fidelity.json`` are rebuilt from everything DEST holds. All slices given in one invocation are checked and merged in a
scratch copy first, so a failing slice leaves DEST as it was.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fidelity  # noqa: E402
from bench_session import COMPLETE_CONFIG, gzip_large_prompts  # noqa: E402
from tqbench.merge import MergeError, merge_runs  # noqa: E402
from tqbench.report import build_report  # noqa: E402

SIDE_FOLDERS = ("vllm-bench", "fidelity-reps")


class AssembleError(ValueError):
    pass


def unpack(tarball: Path, scratch: Path) -> Path:
    """The one run directory inside a slice's tarball."""
    if not tarball.is_file():
        raise AssembleError(f"{tarball}: no such file (a slice is the bench-run.tar.gz of one GPU-host run (about 10 minutes))")
    target = scratch / tarball.parent.name / tarball.stem
    target.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(target, filter="data")
    runs = [p for p in target.iterdir() if (p / "run.json").exists()]
    if len(runs) != 1:
        raise AssembleError(f"{tarball}: expected one tqbench run directory inside, found {len(runs)}")
    return runs[0]


def model_of(run_dir: Path) -> str | None:
    return json.loads((run_dir / "run.json").read_text()).get("model")


def add_side_files(dest: Path, source: Path, label: str) -> list[str]:
    added = []
    for folder in SIDE_FOLDERS:
        for path in sorted((source / folder).rglob("*")) if (source / folder).is_dir() else []:
            if not path.is_file():
                continue
            target = dest / path.relative_to(source)
            if target.exists():
                if target.read_bytes() != path.read_bytes():
                    raise AssembleError(f"{label}: {target.relative_to(dest)} is already in {dest.name} with other "
                                        "content (the same measurement from two slices)")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            added.append(str(target.relative_to(dest)))
    skips = source / "session-skips.jsonl"
    if skips.exists():
        with open(dest / "session-skips.jsonl", "a") as out:
            for line in skips.read_text().splitlines():
                if line.strip():
                    out.write(json.dumps({**json.loads(line), "slice": label}) + "\n")
    return added


def record_plan(run_dir: Path, matrix: Path) -> None:
    """run.json ``planned``: the whole matrix the slices belong to, so the report names the cells still missing."""
    config = yaml.safe_load(matrix.read_text())
    info = json.loads((run_dir / "run.json").read_text())
    info["planned"] = {"matrix": matrix.name, "kv_cache_dtypes": config["kv_cache_dtypes"],
                       "latency_scenarios": [s["name"] for s in (config.get("latency") or {}).get("scenarios", [])]}
    (run_dir / "run.json").write_text(json.dumps(info, indent=1, default=str))


def assemble(dest: Path, tarballs: list[Path], matrix: Path = COMPLETE_CONFIG) -> dict:
    with tempfile.TemporaryDirectory(prefix="tq-assemble-") as tmp:
        scratch = Path(tmp)
        work = scratch / "dest" / dest.name
        if dest.exists():
            shutil.copytree(dest, work)
        model = model_of(work) if (work / "run.json").exists() else None
        merged = []
        for tarball in tarballs:
            source = unpack(tarball, scratch / "slices")
            label = f"{tarball.parent.name}/{tarball.name}"
            source_model = model_of(source)
            if model is not None and source_model != model:
                raise AssembleError(f"{label}: measured model {source_model!r}, but {dest.name} holds {model!r}; "
                                    "one run directory per model")
            model = source_model
            try:
                copied = merge_runs(work, [source])["copied"]
            except MergeError as exc:
                raise AssembleError(f"{label}: {exc}") from exc
            merged.append({"slice": label, "cells": copied, "files": add_side_files(work, source, label)})
        record_plan(work, matrix)
        build_report(work)
        if (work / "latency.csv").exists() and (work / "vllm-bench").is_dir():
            (work / "fidelity.json").write_text(json.dumps(fidelity.fidelity(work), indent=1) + "\n")
        gzip_large_prompts(work)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work, dest)
    return {"dest": str(dest), "model": model, "merged": merged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="run directory to create or extend, e.g. bench/results/<date>-h200-<model>")
    parser.add_argument("slices", type=Path, nargs="+", help="bench-run.tar.gz of each slice")
    parser.add_argument("--matrix", type=Path, default=COMPLETE_CONFIG,
                        help="the bench config the slices belong to (default gpu-complete.yaml): the report lists "
                             "its cells that no slice measured yet")
    args = parser.parse_args(argv)
    try:
        result = assemble(args.dest, args.slices, args.matrix)
    except (AssembleError, fidelity.FidelityError) as exc:
        print(f"assemble: {exc}", file=sys.stderr)
        return 2
    for entry in result["merged"]:
        print(f"{entry['slice']}: {len(entry['cells'])} cells, {len(entry['files'])} vllm-bench/fidelity files")
    print(f"assemble: {result['dest']} ({result['model']}), report and fidelity rebuilt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

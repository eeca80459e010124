"""Raw results as JSON lines: appended as they arrive, so a crash loses nothing already measured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

DONE_MARKER = "DONE"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield records; a torn last line (crash mid-write) is skipped, not fatal."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def mark_done(cell_dir: Path, summary: dict[str, Any] | None = None) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / DONE_MARKER).write_text(json.dumps(summary or {}, sort_keys=True, default=str))


def is_done(cell_dir: Path) -> bool:
    return (cell_dir / DONE_MARKER).exists()


def short_message(text: str, limit: int = 400) -> str:
    """The first line of an error, shortened at a sentence (or word) end, never mid-word or mid-sentence
    when a sentence end exists; says where the full text is when shortened."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    if len(line) <= limit:
        return line
    head = line[:limit]
    cut = max(head.rfind(". "), head.rfind("; "), head.rfind("): "))
    if cut > limit // 3:
        return head[:cut + 1].rstrip() + " … (full message in raw/failures.jsonl)"
    return head[:head.rfind(" ")].rstrip() + " … (full message in raw/failures.jsonl)"

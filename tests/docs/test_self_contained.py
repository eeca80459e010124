"""The repository cites only what its reader can open.

Notes that lived outside the repository while tqstack was being built (gate and GPU-host write-ups,
a shared research folder) and time accounting of the machines it was built on are not part of the
project: a tracked file that points at them sends a reader nowhere.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()
# Checks that search for these names spell them out; they are not citations.
SEARCHERS = {THIS_FILE, ".ci/check-self-contained"}
FORBIDDEN = re.compile(r"gates\.md|gpu-host\.md|shared/research|device[- ]minutes?", re.IGNORECASE)


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name and name not in SEARCHERS]


def test_no_tracked_file_cites_notes_outside_the_repository():
    hits = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:160]}")
    assert not hits, "cite the README section, the test or the upstream issue instead:\n" + "\n".join(hits)

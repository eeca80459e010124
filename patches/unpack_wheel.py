#!/usr/bin/env python3
"""Verify a cached vLLM wheel's sha256 and unpack its Python sources and dist-info into DEST.

Compiled extensions (*.so, the vllm-rs binary) are left out: they are CUDA builds that cannot load
on the CPU test machine, the patches never touch them, and they are ~90% of the wheel's 730 MB.
Usage: unpack_wheel.py WHEEL SHA256 DEST [MEMBER_PREFIX ...]  (prefixes: extract only those members)
"""
import hashlib
import shutil
import sys
import zipfile
from pathlib import Path

SKIPPED_SUFFIXES = (".so",)
SKIPPED_NAMES = {"vllm/vllm-rs"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    wheel, expected, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    prefixes = tuple(sys.argv[4:])
    found = file_sha256(wheel)
    if found != expected:
        print(f"unpack_wheel: {wheel} has sha256 {found}, expected {expected}; "
              f"delete it and rerun make to download it again", file=sys.stderr)
        return 1
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if name.endswith(SKIPPED_SUFFIXES) or name in SKIPPED_NAMES:
                continue
            if prefixes and not name.startswith(prefixes):
                continue
            archive.extract(member, partial)
            count += 1
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    print(f"unpack_wheel: {count} files of {wheel.name} (sha256 ok) -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

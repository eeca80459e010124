#!/usr/bin/env python3
"""Rewrite a wheel uncompressed (ZIP_STORED), optionally dropping members.

Usage: repack_wheel.py SRC.whl DST.whl [--drop PREFIX ...]

Why stored: the kit is xz-compressed as a whole afterwards, and xz shrinks raw
machine code far better than already-deflated zip members. Member order and
timestamps are kept from the source, so the output is byte-for-byte reproducible.
Dropped members are also removed from the wheel's RECORD so pip installs cleanly.
"""
import argparse
import sys
import zipfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--drop", nargs="*", default=[], help="member path prefixes to leave out")
    args = parser.parse_args()

    def dropped(name: str) -> bool:
        return any(name == p or name.startswith(p.rstrip("/") + "/") for p in args.drop)

    kept_bytes = dropped_bytes = 0
    with zipfile.ZipFile(args.src) as src, zipfile.ZipFile(args.dst, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                dropped_bytes += info.file_size
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
            kept_bytes += len(data)
    unmatched = [p for p in args.drop if not any(dropped_name.startswith(p.rstrip("/")) for dropped_name in
                                                  (i.filename for i in zipfile.ZipFile(args.src).infolist()))]
    if unmatched:
        print(f"repack_wheel: --drop prefixes matched nothing in {args.src}: {unmatched}", file=sys.stderr)
        return 1
    print(f"repack_wheel: {args.dst}: kept {kept_bytes / 2**20:.1f} MiB, dropped {dropped_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

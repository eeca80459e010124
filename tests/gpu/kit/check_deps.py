#!/usr/bin/env python3
"""Check that the kit's wheels plus the host image satisfy each other's Requires-Dist.

Usage: check_deps.py WHEEL_DIR HOST_PACKAGES_TXT [--ignore NAME ...]

Every requirement (evaluated for CPython 3.12 on Linux x86_64, no extras) of every
wheel in WHEEL_DIR must be met by a wheel of the kit (name and version) or be a package the
host image already has (version checked only where host-packages.txt pins one).
Requirements on GPU-only kernels that the kit leaves out on purpose are passed with
--ignore. Exits 1 listing each unmet requirement, so a missing wheel shows up here and
not as an ImportError on the GPU host.
"""
import argparse
import pathlib
import sys
import zipfile
from email.parser import HeaderParser

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HOST_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def wheel_requirements(wheel: pathlib.Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(metadata_name).decode())
    requirements = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(HOST_ENV)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=pathlib.Path)
    parser.add_argument("host_packages", type=pathlib.Path)
    parser.add_argument("--ignore", nargs="*", default=[], help="requirement names left out on purpose")
    args = parser.parse_args()

    kit_wheels = {}
    for wheel in sorted(args.wheel_dir.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in kit_wheels:
            print(f"two versions of {name} in the kit: {kit_wheels[name][0]} and {version}", file=sys.stderr)
            return 1
        kit_wheels[name] = (version, wheel)

    host = {}
    for line in args.host_packages.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            host[canonicalize_name(name)] = version or None

    ignored = {canonicalize_name(n) for n in args.ignore}
    unmet = []
    for name, (_, wheel) in kit_wheels.items():
        for requirement in wheel_requirements(wheel):
            required = canonicalize_name(requirement.name)
            if required in ignored:
                continue
            if required in kit_wheels:
                if not requirement.specifier.contains(kit_wheels[required][0], prereleases=True):
                    unmet.append(f"{name}: needs {requirement}, the kit has {kit_wheels[required][0]}")
            elif required in host:
                host_version = host[required]
                if host_version and not requirement.specifier.contains(host_version, prereleases=True):
                    unmet.append(f"{name}: needs {requirement}, host has {host_version} (add a wheel to the kit)")
            else:
                unmet.append(f"{name}: needs {requirement}, neither in the kit nor on the host")
    for line in unmet:
        print("UNMET", line, file=sys.stderr)
    print(f"check_deps: {len(kit_wheels)} wheels, {len(unmet)} unmet requirements")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())

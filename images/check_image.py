#!/usr/bin/env python3
"""In-image checks of a built tqstack image, run as the image's own (non-root) user with buildah.

Usage: check_image.py IMAGE [--compose-dir DIR] [--storage "--storage-driver vfs"]
Starts a working container from IMAGE (`buildah from`), runs each check with
`buildah run --isolation chroot --user <the image's USER>` (the image's ENV and WORKDIR apply), prints
one `ok`/`FAIL` line per check with the command it ran, removes the container, exits 1 if any failed:
  * user        the image's USER is set, is not root, and has a passwd entry
  * verify.py   images/common/verify.py passes (--expect-series-sha256 = the image's label)
  * entrypoint  the ENTRYPOINT with --help (`vllm serve --help`) exits 0 and prints its usage, and
                `vllm serve --help=kv-cache-dtype` lists the four TurboQuant dtypes. vLLM picks its platform
                through the NVIDIA driver (NVML) and its CUDA extensions link libcuda.so.1, so on a host with
                no GPU a CUDA image gets driver stand-ins mounted where the container toolkit puts the
                driver's libraries: images/standin/nvml-stub.c (one GPU of the image's io.tqstack.cuda-arch)
                and a libcuda.so.1 generated from the cu* symbols the image's libraries import, each
                returning CUDA_ERROR_NO_DEVICE. Nothing runs on a GPU; this proves the CLI and its imports.
                In a CPU-torch test build (torch "+cpu") the CUDA vLLM wheel's platform cannot load, so
                the check is that the ENTRYPOINT's program is on PATH and the vLLM CLI modules import.
  * cache dirs  every directory the compose files for this image mount or point a cache variable at
                (HF_HOME, VLLM_CACHE_ROOT, TRITON_CACHE_DIR), and $HOME, ~/.cache, ~/.nv, exists in the
                image and the user can create a file in it (a named volume starts as a copy of the
                image's directory, owner included)
  * control     the user can NOT write to /opt/venv (so the writable checks mean something)
  * healthcheck the compose healthcheck's interpreter is on the user's PATH and runs its code up to the
                request (urllib.request imports, the command compiles)
Needs PyYAML, and gcc and nm (binutils) for the driver stand-ins, on the host.
"""
from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def compose_facts(compose_dir: Path, image_ref: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Directories, healthcheck tests and file names of the compose services that run image_ref."""
    dirs: list[str] = []
    healthchecks: list[list[str]] = []
    files: list[str] = []
    for path in sorted(compose_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for service in (doc.get("services") or {}).values():
            if service.get("image") != image_ref:
                continue
            files.append(path.name)
            for volume in service.get("volumes") or []:
                parts = volume.split(":")
                target = parts[1] if len(parts) > 1 else parts[0]
                # only the image user's own directories (device paths such as /dev/dri/by-path are read-only)
                if target.startswith("/home/") and target not in dirs:
                    dirs.append(target)
            env = service.get("environment") or {}
            for key in ("HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
                if key in env and env[key] not in dirs:
                    dirs.append(env[key])
            test = (service.get("healthcheck") or {}).get("test")
            if test and test not in healthchecks:
                healthchecks.append(test)
    return dirs, healthchecks, files


def driver_standins(buildah: list[str], container: str, cuda_arch: str, workdir: Path) -> list[str]:
    """`buildah run` flags that mount stand-ins of the driver's libnvidia-ml.so.1 and libcuda.so.1."""
    root = Path(sh([*buildah, "mount", container]).stdout.strip())
    symbols: set[str] = set()
    for lib in (root / "opt" / "venv").rglob("*.so*"):
        if not lib.is_file() or lib.is_symlink():
            continue
        needed = sh(["readelf", "-d", str(lib)]).stdout
        if "[libcuda.so.1]" not in needed:
            continue
        for line in sh(["nm", "-D", "--undefined-only", str(lib)]).stdout.splitlines():
            name = line.split()[-1].split("@")[0]
            if name.startswith("cu") and name[2:3].isupper():
                symbols.add(name)
    sh([*buildah, "umount", container])
    source = workdir / "cuda-stub.c"
    # 100 = CUDA_ERROR_NO_DEVICE
    source.write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in sorted(symbols)))
    libs = workdir / "lib"
    libs.mkdir()
    for cmd in (["gcc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(libs / "libcuda.so.1"),
                 str(source)],
                ["gcc", "-shared", "-fPIC", "-O2", "-o", str(libs / "libnvidia-ml.so.1"),
                 str(REPO / "images" / "standin" / "nvml-stub.c")]):
        result = sh(cmd)
        if result.returncode:
            raise SystemExit(f"check_image.py: {shlex.join(cmd)} failed: {result.stderr}")
    print(f"       (driver stand-ins: libnvidia-ml.so.1 reporting one GPU of compute capability {cuda_arch}, "
          f"libcuda.so.1 with the {len(symbols)} cu* symbols the image's libraries import)")
    return ["--volume", f"{libs}:/usr/local/nvidia/lib64:ro", "--env", f"TQ_STUB_NVML_CC={cuda_arch}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("--compose-dir", type=Path, default=REPO / "compose")
    parser.add_argument("--storage", default="--storage-driver vfs")
    parser.add_argument("--skip", action="append", default=[], choices=["verify.py", "entrypoint"],
                        help="leave a check out (reported as skipped, with --skip-reason)")
    parser.add_argument("--skip-reason", default="")
    args = parser.parse_args(argv)
    buildah = ["buildah", *shlex.split(args.storage)]

    info = json.loads(sh([*buildah, "inspect", "--type", "image", args.image]).stdout)
    config = info["Docker"]["config"] if info.get("Docker", {}).get("config") else info["OCIv1"]["config"]
    user = config.get("User") or ""
    entrypoint = config.get("Entrypoint") or []
    labels = config.get("Labels") or {}
    hardware = labels.get("io.tqstack.hardware", "")
    series_sha = labels.get("io.tqstack.patch-series.sha256", "")
    image_ref = f"tqstack/vllm:{labels.get('org.opencontainers.image.version', '')}"
    dirs, healthchecks, compose_files = compose_facts(args.compose_dir, image_ref)
    # HOME and the caches vLLM's dependencies keep under it without a variable (FlashInfer and torch
    # extensions in ~/.cache, the CUDA JIT cache in ~/.nv, which images/README.md suggests mounting)
    home = next((e.split("=", 1)[1] for e in config.get("Env") or [] if e.startswith("HOME=")), "")
    for extra in ([home, f"{home}/.cache", f"{home}/.nv"] if home else []):
        if extra not in dirs:
            dirs.append(extra)
    print(f"# in-image checks: {args.image} (hardware {hardware}, USER {user!r}, "
          f"ENTRYPOINT {entrypoint}, compose files for {image_ref}: {', '.join(compose_files) or 'none'})")

    container = sh([*buildah, "from", "--pull=never", args.image]).stdout.strip().splitlines()[-1]
    workdir = tempfile.mkdtemp(prefix="tqstack-check-")
    failures = 0

    def run(cmd: list[str], timeout: int = 900, flags: list[str] | None = None) -> subprocess.CompletedProcess:
        return sh([*buildah, "run", "--isolation", "chroot", "--user", user, *(flags or []), container, "--", *cmd],
                  timeout)

    def report(name: str, ok: bool, cmd: list[str], detail: str, seconds: float | None = None) -> None:
        nonlocal failures
        failures += not ok
        took = f" ({seconds:.0f} s)" if seconds is not None else ""
        print(f"{'ok  ' if ok else 'FAIL'} {name}: $ {shlex.join(cmd)}{took}")
        for line in detail.strip().splitlines():
            print(f"       {line}")

    try:
        cmd = ["sh", "-c", "id; echo HOME=$HOME PATH=$PATH; pwd"]
        result = run(cmd)
        ok = (result.returncode == 0 and user not in ("", "0", "root")
              and "uid=0(" not in result.stdout
              and (not user.isdigit() or f"uid={user}(" in result.stdout))  # "(" : has a passwd entry
        report("user", ok, cmd, result.stdout + result.stderr)

        if not compose_files:
            report("compose", False, [], f"no compose file under {args.compose_dir} runs {image_ref}")

        for name in args.skip:
            print(f"skip {name}: {args.skip_reason}")
        cmd = ["python", "/opt/tqstack/images/common/verify.py", "--patches-dir", "/opt/tqstack/patches"]
        if series_sha:
            cmd += ["--expect-series-sha256", series_sha]
        start = time.monotonic()
        result = run(cmd) if "verify.py" not in args.skip else None
        if result is not None:
                report("verify.py", result.returncode == 0, cmd, result.stdout + result.stderr[-3000:],
                   time.monotonic() - start)
        series = run(["sh", "-c", "grep -cvE '^(#|$)' /opt/tqstack/patches/vllm-0.26.0/series"])
        print(f"       (series in the image: {series.stdout.strip()} patches, sha256 {series_sha or 'unlabelled'})")

        cmd = [*entrypoint, "--help"]
        torch_version = run(["python", "-c", "import importlib.metadata as m; print(m.version('torch'))"])
        cpu_torch = "+cpu" in torch_version.stdout
        if "entrypoint" not in args.skip and cpu_torch:
            # The CPU-torch test build (TQSTACK_TORCH_SOURCE=cpu) carries PyPI's CUDA vLLM wheel without the
            # CUDA runtime: its platform cannot load, so `vllm serve --help` is left to the full builds.
            # Here: the ENTRYPOINT's program is on the user's PATH and its CLI modules import.
            # what the console script itself imports (bin/vllm: from vllm.entrypoints.cli.main import main)
            cmd = ["sh", "-c", f"command -v {entrypoint[0]} && python -c 'from vllm.entrypoints.cli.main import main; "
                               "print(\"vllm CLI imports\")'"]
            result = run(cmd)
            report(f"entrypoint resolves and imports (torch {torch_version.stdout.strip()}: "
                   f"`{shlex.join([*entrypoint, '--help'])}` needs the CUDA torch, run in the full builds)",
                   result.returncode == 0 and "vllm CLI imports" in result.stdout, cmd,
                   "\n".join(line for line in (result.stdout + result.stderr[-2000:]).splitlines()
                             if not line.startswith("INFO")))
        if "entrypoint" not in args.skip and not cpu_torch:
            flags: list[str] = []
            envs = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
            if "NVIDIA_VISIBLE_DEVICES" in envs:
                flags = driver_standins(buildah, container, labels.get("io.tqstack.cuda-arch") or "8.6",
                                        Path(workdir))
            start = time.monotonic()
            result = run(cmd, flags=flags)
            text = result.stdout + result.stderr
            ok = result.returncode == 0 and "usage: vllm serve" in text
            lines = text.strip().splitlines()
            shown = lines if not ok else [line for line in lines if line.lower().startswith("usage")][:1] + \
                [f"... ({len(lines)} lines of help)"]
            report("entrypoint", ok, cmd, "\n".join(shown[-40:]), time.monotonic() - start)
            cmd = [*entrypoint, "--help=kv-cache-dtype"]
            result = run(cmd, flags=flags)
            text = result.stdout + result.stderr
            dtypes = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
            ok = result.returncode == 0 and all(d in text for d in dtypes)
            shown = [line for line in text.splitlines() if "turboquant" in line or "kv-cache-dtype" in line]
            report("entrypoint kv-cache-dtype choices", ok, cmd,
                   "\n".join(shown[:6]) if ok else text[-3000:])

        for directory in dirs:
            probe = f"{directory}/.tqstack-write-check"
            cmd = ["sh", "-c", f"test -d {directory} && touch {probe} && rm {probe} && stat -c '%U:%G %a %n' {directory}"]
            result = run(cmd)
            report(f"writable {directory}", result.returncode == 0, cmd, result.stdout + result.stderr)

        cmd = ["sh", "-c", "touch /opt/venv/.tqstack-write-check"]
        result = run(cmd)
        report("control /opt/venv read-only for the user", result.returncode != 0, cmd,
               (result.stderr or result.stdout or "(write succeeded)"))

        for test in healthchecks:
            if test[0] == "CMD":
                interpreter, code = test[1], test[-1]
            else:  # CMD-SHELL: the shell's first word
                interpreter, code = "sh", ""
            cmd = ["sh", "-c", f"command -v {interpreter}"]
            where = run(cmd)
            probe = [interpreter, "-c", f"import urllib.request, sys; compile({code!r}, 'healthcheck', 'exec'); "
                                       "print(sys.executable, sys.version.split()[0])"]
            result = run(probe)
            report(f"healthcheck interpreter {interpreter}", where.returncode == 0 and result.returncode == 0,
                   probe, where.stdout + result.stdout + result.stderr + f"(healthcheck: {shlex.join(test)})")
    finally:
        sh([*buildah, "rm", container])
        sh(["rm", "-rf", workdir])
    print(f"# in-image checks: {'all passed' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU validation on a 4-GPU host (4x H200): the validation lanes of issues 2-4 side by side.

Runs on the host from the repo root, with the GPU kit and the model parts copied there (tests/gpu/README.md
"Running the matrix on a GPU host", "A 4-GPU run in three phases"). Each phase is one command bounded by
--deadline-s; lanes of a phase run concurrently, each on its own GPU(s), each writing into its own
directory under ``--state`` (in /tmp, kept between phases on the same host), and every lane directory is
packed into ``<results dir>/<lane>.tar.gz`` when the phase ends (RESULTS_DIR, else OUT, else ./out), so
whatever a lane measured before a deadline or a crash is kept.

    phase a (install + TP=4):  kit install, model install (CPU, in the background), then the
                               rtx5060ti-x4 Gemma 4 31B stack at TP=4 on all four GPUs (issue 4), then
                               the stock cases still missing (GPU 0) and the image-bidirectionality
                               probe (GPU 1) side by side
    phase b (lanes):           real-weight checks (GPU 0), engine-mode 32K admission (GPU 1),
                               the harness run with its fidelity check (GPUs 2,3)

    python3 tests/gpu/session.py --phase a --deadline-s 560
    python3 tests/gpu/session.py --phase b --deadline-s 560
    python3 tests/gpu/session.py --phase b --dry-run          # print the plan, start nothing
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_LIMIT = 15 * 1024 * 1024  # each lane's tarball stays small enough to move and keep
# NVLink multicast stays off in every process: shared multi-GPU hosts may not allow it.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Lane:
    name: str
    gpus: str  # CUDA_VISIBLE_DEVICES
    argv: list[str]  # "{out}" and "{deadline}" are filled in at start
    env: dict[str, str] = field(default_factory=dict)
    reserve_s: float = 20  # deadline margin the lane leaves for packing
    max_s: float | None = None  # cap, for a lane that must leave the rest of the phase to others

    def command(self, out: Path, deadline_s: float) -> list[str]:
        return [a.replace("{out}", str(out)).replace("{deadline}", str(int(deadline_s))) for a in self.argv]


STOCK_CASES = ("^unpatched/(gemma-4-31b-it|gemma-4-e4b-it|qwen3.6-27b)/turboquant_3bit_nc$"
               "|^unpatched/gemma-4-e4b-it/turboquant_k3v4_nc$|^unpatched/qwen3.6-27b/turboquant_k8v4$")
PY = [sys.executable, "-u"]


def phase_lanes(phase: str) -> tuple[list[list[str]], list[Lane], list[Lane]]:
    """(setup commands, exclusive lanes run one after another on every GPU, concurrent lanes)."""
    if phase == "a":
        setup = [["bash", "tests/gpu/kit/install.sh"]]
        exclusive = [Lane("stacks-tp4", "0,1,2,3", [
            *PY, "tests/gpu/stacks/serve_stacks.py", "--site", "/tmp/site-patched", "--out", "{out}",
            "--state-dir", "/tmp/tq-stacks", "--stacks", "rtx5060ti-x4-gemma4-31b", "--enforce-eager",
            "--budget-s", "{deadline}"], env={"PYTHONPATH": "/tmp/site-patched"}, max_s=330)]
        concurrent = [
            Lane("stock", "0", [*PY, "tests/gpu/matrix.py", "--variants", "unpatched", "--cases", STOCK_CASES,
                                "--results-dir", "{out}", "--deadline-s", "{deadline}", "--timeout-per-case", "240"]),
            Lane("mm-prefix", "1", [*PY, "tests/gpu/mm_prefix_probe.py", "--out", "{out}",
                                    "--deadline-s", "{deadline}"], env={"PYTHONPATH": "/tmp/site-patched"}),
        ]
        return setup, exclusive, concurrent
    if phase == "b":
        concurrent = [
            Lane("real-weights", "0", [*PY, "tests/gpu/real_weights.py", "--out", "{out}",
                                       "--deadline-s", "{deadline}"]),
            Lane("admission", "1", [*PY, "tests/gpu/matrix.py", "--variants", "patched",
                                    "--cases", "^patched/gemma-4-31b-it/turboquant_4bit_nc",
                                    "--admission-mode", "engine", "--max-num-batched-tokens", "2048",
                                    "--results-dir", "{out}", "--deadline-s", "{deadline}",
                                    "--timeout-per-case", "{deadline}"]),
            Lane("bench", "2,3", ["bash", "tests/gpu/bench/run_bench.sh", "auto,turboquant_4bit_nc"],
                 env={"ENFORCE_EAGER": "1", "BUDGET_S": "{deadline}", "RESULTS_DIR": "{out}"}),
        ]
        return [], [], concurrent
    if phase == "c":  # a fresh machine: what phases a and b left undone
        setup = [["bash", "tests/gpu/kit/install.sh"]]
        concurrent = [
            Lane("mm-prefix", "0", [*PY, "tests/gpu/mm_prefix_probe.py", "--out", "{out}",
                                    "--deadline-s", "{deadline}"], env={"PYTHONPATH": "/tmp/site-patched"}),
            Lane("admission-n1", "1", [*PY, "tests/gpu/matrix.py", "--variants", "patched",
                                       "--cases", "^patched/gemma-4-31b-it/turboquant_4bit_nc",
                                       "--admission-mode", "engine", "--engine-only-n-plus-1",
                                       "--max-num-batched-tokens", "2048", "--results-dir", "{out}",
                                       "--deadline-s", "{deadline}", "--timeout-per-case", "{deadline}"]),
            Lane("stock", "2", [*PY, "tests/gpu/matrix.py", "--variants", "unpatched", "--cases", STOCK_CASES,
                                "--results-dir", "{out}", "--deadline-s", "{deadline}", "--timeout-per-case", "240"]),
        ]
        return setup, [], concurrent
    raise SystemExit(f"--phase: unknown {phase!r}; valid: a, b, c")


def log(message: str) -> None:
    print(f"[session {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start(lane: Lane, state: Path, deadline_s: float) -> tuple[subprocess.Popen, Path, object]:
    out = state / lane.name
    out.mkdir(parents=True, exist_ok=True)
    lane_deadline = max(min(deadline_s, lane.max_s or deadline_s) - lane.reserve_s, 30)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": lane.gpus, "RESULTS_DIR": str(out),
           **{k: v.replace("{out}", str(out)).replace("{deadline}", str(int(lane_deadline)))
              for k, v in lane.env.items()}}
    argv = lane.command(out, lane_deadline)
    logfile = open(state / f"{lane.name}.log", "ab")
    log(f"start {lane.name} on GPU {lane.gpus} (deadline {lane_deadline:.0f} s): {shlex.join(argv)}")
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, out, logfile


def wait_all(running: list[tuple[Lane, subprocess.Popen, object]], until: float) -> None:
    for lane, process, logfile in running:
        try:
            process.wait(timeout=max(until - time.time(), 1))
        except subprocess.TimeoutExpired:
            log(f"{lane.name}: past the phase deadline, stopping it")
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        logfile.close()
        log(f"end {lane.name}: exit {process.returncode}")


def pack(state: Path, name: str, out_dir: Path) -> None:
    """Lane dir + its log into <results dir>/<lane>.tar.gz; drop the biggest logs first if it is too big."""
    members = sorted((p for p in [state / f"{name}.log", *(state / name).rglob("*")] if p.is_file()),
                     key=lambda p: p.stat().st_size)
    target = out_dir / f"{name}.tar.gz"
    while members:
        with tarfile.open(target, "w:gz") as tar:
            for path in members:
                tar.add(path, arcname=str(path.relative_to(state)))
        if target.stat().st_size <= PACK_LIMIT:
            break
        dropped = members.pop()
        log(f"pack {name}: {target.stat().st_size} B is too big, leaving out {dropped.name}")
    log(f"packed {target.name} ({target.stat().st_size} B)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, help="a (install + TP=4 + stock + image probe) or b (lanes)")
    parser.add_argument("--deadline-s", type=float, default=560, help="the whole phase, packing included")
    parser.add_argument("--state", type=Path, default=Path("/tmp/tq-session"))
    parser.add_argument("--lanes", default="", help="comma list: run only these lanes of the phase")
    parser.add_argument("--skip-setup", action="store_true", help="the kit is installed already")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    t0 = time.time()
    os.environ.update(NO_MULTICAST)
    setup, exclusive, concurrent = phase_lanes(args.phase)
    if args.lanes:
        wanted = set(args.lanes.split(","))
        known = {lane.name for lane in exclusive + concurrent}
        if wanted - known:
            parser.error(f"--lanes: unknown {sorted(wanted - known)}; valid for phase {args.phase}: {sorted(known)}")
        exclusive = [lane for lane in exclusive if lane.name in wanted]
        concurrent = [lane for lane in concurrent if lane.name in wanted]
    if args.dry_run:
        for command in setup:
            print("setup     ", shlex.join(command))
        for lane in exclusive + concurrent:
            kind = "exclusive " if lane in exclusive else "concurrent"
            print(f"{kind} {lane.name:13} GPU {lane.gpus:8} {shlex.join(lane.command(Path('RESULTS_DIR/' + lane.name), 0))}")
        return 0
    out_dir = Path(os.environ.get("RESULTS_DIR") or os.environ.get("OUT") or REPO / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    args.state.mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.deadline_s - 25  # packing

    if not args.skip_setup:
        for command in setup:
            log(f"setup: {shlex.join(command)}")
            if subprocess.run(command, cwd=REPO).returncode != 0:
                log("setup failed: nothing else can run")
                return 1
    models = None
    if args.phase == "a" and (REPO / "tests/gpu/kit/models.sh").exists():
        # CPU-only GGUF -> HF conversion for phase b, while the GPUs serve the TP=4 stack.
        models = subprocess.Popen(["bash", "tests/gpu/kit/models.sh", "install"], cwd=REPO,
                                  stdout=open(args.state / "models-install.log", "ab"), stderr=subprocess.STDOUT)
        log("models.sh install started in the background")

    for lane in exclusive:
        process, _, logfile = start(lane, args.state, deadline - time.time())
        wait_all([(lane, process, logfile)], min(deadline, time.time() + (lane.max_s or deadline)))
    running = []
    for lane in concurrent:
        process, _, logfile = start(lane, args.state, deadline - time.time())
        running.append((lane, process, logfile))
    wait_all(running, deadline)
    if models is not None:
        try:
            models.wait(timeout=max(deadline - time.time(), 5))
            log(f"models.sh install: exit {models.returncode}")
        except subprocess.TimeoutExpired:
            log("models.sh install still running at the deadline (it goes on in the background)")
        pack_log = args.state / "models-install.log"
        if pack_log.exists():
            (out_dir / "models-install.log").write_bytes(pack_log.read_bytes()[-4_000_000:])
    for lane in exclusive + concurrent:
        pack(args.state, lane.name, out_dir)
    log(f"phase {args.phase} done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

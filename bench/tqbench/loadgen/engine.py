"""Locust load-generation process for one latency scenario.

Runs in its own process (``python -m tqbench.loadgen.engine SPEC``) because locust monkey-patches
the standard library with gevent; the runner and report code never import it.

- closed loop (request_rate = inf): ``concurrency`` locust users, each sending its next prompt when
  the previous response has finished, until all ``num_prompts`` are served;
- open loop: one dispatcher user fires requests at the gamma/Poisson arrival times of
  ``schedule.arrival_offsets_s`` and a semaphore caps requests in flight at ``concurrency``;
- ``workers`` > 0: a locust master plus that many worker processes on this host; prompt i goes to
  worker i % workers (open-loop workers keep the global arrival times of their prompts, from a
  start time the master broadcasts), each worker writes its own ``requests.w<k>.jsonl``.

Every request becomes one raw JSONL record (``request.stream_completion``) as soon as it ends;
locust's own (rounded) statistics are only used for its console output.
"""
from __future__ import annotations

import locust  # noqa: F401  (first import: gevent monkey-patching must precede ssl/httpx)

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import httpx
from locust import User, constant, task
from locust.env import Environment

from tqbench.loadgen.request import completion_payload, stream_completion
from tqbench.loadgen.schedule import arrival_offsets_s
from tqbench.records import append_jsonl

log = logging.getLogger("tqbench.loadgen")


class ScenarioState:
    """What one load-generating process has to send, and where its records go."""

    def __init__(self, spec: dict, label: str, indices: list[int], out_path: Path):
        self.spec = spec
        self.label = label
        self.queue = list(indices)
        self.assigned = len(indices)
        self.finished_count = 0
        self.finished = gevent.event.Event()
        self.out_path = out_path
        prompts = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines() if line.strip()]
        self.prompts = {p["index"]: p for p in prompts}
        self.client = httpx.Client(
            limits=httpx.Limits(max_connections=spec["scenario"]["concurrency"] + 8), timeout=spec["request_timeout_s"]
        )
        self.start_at_unix: float | None = None
        self.dispatch_started = False
        if not indices:
            self.finished.set()

    def send(self, index: int, warmup: bool = False, scheduled_ns: int | None = None, events=None,
             t0_ns: int | None = None) -> dict:
        spec, scenario = self.spec, self.spec["scenario"]
        prompt = self.prompts[index]
        payload = completion_payload(spec["model"], prompt["prompt"], scenario["output_len"], spec["temperature"])
        headers = {"Authorization": f"Bearer {spec['api_key']}"} if spec.get("api_key") else {}
        request_id = f"{spec['kv_cache_dtype']}-{scenario['name']}-{'w' if warmup else ''}{index}-{spec['seed']}"
        record = stream_completion(self.client, spec["base_url"], payload, headers, request_id, spec["request_timeout_s"])
        record.update(
            scenario=scenario["name"], kv_cache_dtype=spec["kv_cache_dtype"], index=index, warmup=warmup,
            process=self.label, prompt_len_target=prompt["prompt_len"], output_len_target=scenario["output_len"],
            scheduled_ns=scheduled_ns, t0_ns=t0_ns,
        )
        append_jsonl(self.out_path, record)
        if events is not None:  # locust console stats only; our metrics come from the raw record
            events.request.fire(
                request_type="POST", name=scenario["name"], context={},
                response_time=(record["end_ns"] - record["start_ns"]) / 1e6,
                response_length=record["completion_tokens"] or 0,
                exception=None if record["ok"] else RuntimeError(record["error"]),
            )
        return record

    def complete_one(self) -> None:
        self.finished_count += 1
        if self.finished_count >= self.assigned:
            self.finished.set()


class ClosedLoopUser(User):
    """Sends the next prompt as soon as its previous request has finished."""

    wait_time = constant(0)

    @task
    def next_request(self) -> None:
        state: ScenarioState = self.environment.tq_state
        if not state.queue:
            gevent.sleep(0.05)  # idle until the runner quits; stopping users early confuses the master
            return
        index = state.queue.pop(0)
        state.send(index, events=self.environment.events)
        state.complete_one()


class OpenLoopDispatcher(User):
    """Fires this process's share of the arrival schedule; a semaphore caps requests in flight."""

    wait_time = constant(0)

    @task
    def dispatch(self) -> None:
        state: ScenarioState = self.environment.tq_state
        if state.dispatch_started:
            gevent.sleep(0.05)
            return
        state.dispatch_started = True
        scenario, spec = state.spec["scenario"], state.spec
        offsets = arrival_offsets_s(scenario["num_prompts"], scenario["request_rate"], scenario["burstiness"], spec["seed"])
        cap = max(1, math.ceil(scenario["concurrency"] / max(1, spec["workers"])))
        semaphore = gevent.lock.BoundedSemaphore(cap)
        pool = gevent.pool.Group()
        if state.start_at_unix is not None:  # distributed: shared time zero from the master
            gevent.sleep(max(0.0, state.start_at_unix - time.time()))
        t0 = time.perf_counter_ns()

        def fire(index: int, scheduled_ns: int) -> None:
            with semaphore:
                state.send(index, scheduled_ns=scheduled_ns, events=self.environment.events, t0_ns=t0)
            state.complete_one()

        for index in list(state.queue):
            scheduled_ns = t0 + int(offsets[index] * 1e9)
            gevent.sleep(max(0.0, (scheduled_ns - time.perf_counter_ns()) / 1e9))
            pool.spawn(fire, index, scheduled_ns)
        state.queue.clear()
        pool.join()


def _warmup(state: ScenarioState, warmup_indices: list[int], concurrency: int) -> None:
    pool = gevent.pool.Pool(concurrency)
    for index in warmup_indices:
        pool.spawn(state.send, index, True)
    pool.join()


def _user_class(spec: dict) -> type[User]:
    return ClosedLoopUser if math.isinf(spec["scenario"]["request_rate"]) else OpenLoopDispatcher


def _deadline_s(spec: dict) -> float:
    scenario = spec["scenario"]
    rounds = math.ceil(scenario["num_prompts"] / scenario["concurrency"]) + 1
    arrivals = 0.0 if math.isinf(scenario["request_rate"]) else scenario["num_prompts"] / scenario["request_rate"]
    return arrivals + rounds * spec["request_timeout_s"] + 60


def run_local(spec: dict, out_dir: Path) -> None:
    scenario = spec["scenario"]
    measured = list(range(scenario["num_prompts"]))
    state = ScenarioState(spec, "local", measured, out_dir / "requests.jsonl")
    _warmup(state, list(range(scenario["num_prompts"], scenario["num_prompts"] + spec["num_warmups"])),
            scenario["concurrency"])
    user_class = _user_class(spec)
    env = Environment(user_classes=[user_class])
    env.tq_state = state
    runner = env.create_local_runner()
    users = scenario["concurrency"] if user_class is ClosedLoopUser else 1
    runner.start(users, spawn_rate=users)
    if not state.finished.wait(timeout=_deadline_s(spec)):
        raise TimeoutError(f"scenario {scenario['name']} did not finish within {_deadline_s(spec):.0f} s")
    runner.quit()


def run_master(spec: dict, out_dir: Path, spec_path: Path) -> None:
    scenario, workers = spec["scenario"], spec["workers"]
    state = ScenarioState(spec, "master", [], out_dir / "requests.master.jsonl")
    user_class = _user_class(spec)
    env = Environment(user_classes=[user_class])
    env.tq_state = state
    runner = env.create_master_runner(master_bind_host="127.0.0.1", master_bind_port=spec["master_port"])
    done_workers: set[int] = set()
    all_done = gevent.event.Event()

    def on_done(environment, msg, **_kwargs) -> None:
        done_workers.add(msg.data["worker"])
        if len(done_workers) >= workers:
            all_done.set()

    runner.register_message("tq_done", on_done)
    procs = [
        subprocess.Popen([sys.executable, "-m", "tqbench.loadgen.engine", str(spec_path), "--role", "worker",
                          "--worker-index", str(k)])
        for k in range(workers)
    ]
    try:
        deadline = time.monotonic() + 120
        while runner.worker_count < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"only {runner.worker_count} of {workers} locust workers connected")
            gevent.sleep(0.2)
        _warmup(state, list(range(scenario["num_prompts"], scenario["num_prompts"] + spec["num_warmups"])),
                scenario["concurrency"])
        runner.send_message("tq_start", {"start_at_unix": time.time() + 1.0})
        gevent.sleep(0.2)
        users = scenario["concurrency"] if user_class is ClosedLoopUser else workers
        runner.start(users, spawn_rate=users)
        deadline = time.monotonic() + _deadline_s(spec)
        while not all_done.wait(timeout=1.0):
            dead = [k for k, p in enumerate(procs) if p.poll() not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"locust workers {dead or 'timed out'} before finishing scenario {scenario['name']}")
        runner.quit()
    finally:
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def run_worker(spec: dict, out_dir: Path, worker_index: int) -> None:
    scenario, workers = spec["scenario"], spec["workers"]
    share = [i for i in range(scenario["num_prompts"]) if i % workers == worker_index]
    state = ScenarioState(spec, f"w{worker_index}", share, out_dir / f"requests.w{worker_index}.jsonl")
    env = Environment(user_classes=[_user_class(spec)])
    env.tq_state = state
    runner = env.create_worker_runner(master_host="127.0.0.1", master_port=spec["master_port"])

    def on_start(environment, msg, **_kwargs) -> None:
        state.start_at_unix = msg.data["start_at_unix"]

    runner.register_message("tq_start", on_start)

    def report_when_finished() -> None:
        state.finished.wait()
        runner.send_message("tq_done", {"worker": worker_index, "count": state.finished_count})

    gevent.spawn(report_when_finished)
    runner.greenlet.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--role", choices=["local", "master", "worker"], default=None)
    parser.add_argument("--worker-index", type=int, default=0)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    spec["scenario"]["request_rate"] = float(spec["scenario"]["request_rate"])
    out_dir = args.spec.parent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    role = args.role or ("master" if spec["workers"] > 0 else "local")
    if role == "local":
        run_local(spec, out_dir)
    elif role == "master":
        run_master(spec, out_dir, args.spec)
    else:
        run_worker(spec, out_dir, args.worker_index)


if __name__ == "__main__":
    main()

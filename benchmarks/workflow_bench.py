#!/usr/bin/env python3
"""A users' workflow through vramctl's gateway: an LLM plans, SDXL draws, the
LLM judges; every way of switching vramctl has, against the users' own way.

Run on a machine with an NVIDIA GPU (torch, diffusers, transformers,
safetensors, nvidia-ml-py, openai), from the repository root:

    python benchmarks/workflow_bench.py --rounds 2 --concurrent 2   # ~4-5 min on an H100
    python benchmarks/workflow_bench.py --dry-run --rounds 1 --concurrent 2 --modes sleep,users

The models are warm_proof.py's (imported from it): ``llm``, the torch LLM
stand-in (benchmarks/cuda_workload.py, ``--llm-weights-mib`` of fp16 weights
plus KV cache), and ``sdxl``, vramctl's SDXL server with the full-size
pipeline and random weights; in ``--dry-run`` the simulated GPU, the
stand-in without torch and the tiny pipeline on the CPU. Every call goes
through the official ``openai`` client: ``chat.completions.create`` (plan),
``images.generate`` (draw; ``--steps`` steps at ``--size``), and
``chat.completions.create`` again (judge).

Modes, in one run (``--modes``):

- ``cold``, ``sleep``, ``checkpoint``, ``auto``: ``vramctl up --gateway``
  (the process runtime, the NVML probe; simulated with ``--dry-run``) with
  both models on that ``switchStrategy`` (``sleep``: level 1; ``auto``: sleep,
  checkpoint (``sleep.checkpoint``) or stop, the cost book's choice). The
  gateway's queue switches the GPU as the calls ask for the other model.
- ``users``: what users do without vramctl (a ModelManager): each step starts
  its model's server, waits until it is healthy, calls it, stops it; one
  step on the GPU at a time (a lock), the concurrent workflows included.

Each mode runs ``--rounds`` workflows one after the other, then
``--concurrent`` at once. Reported per mode: each step's and each
workflow's wall time (median, p95), the concurrent batch's wall time, the
switches vramctl made and how (from ``/status``: switch records, sleeps,
checkpoints, stops, fall-backs, auto's ways), or the users' starts and
stops. Before the modes, ``compute``: the same workflows with both servers
started once and kept awake (both fit a big GPU; the dry run's too), so
``plan + draw + judge`` is the pure compute; each mode's ``overhead`` is its
median workflow wall time over that.

Results as JSON to ``--out`` (default ``$OUT/workflow_bench.json`` when OUT
is set, else ./workflow_bench.json), written after each mode as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from free_ports import free_port
from warm_proof import Plan, Supervisor, config, environment, http, stop_group, summary

MODES = ("cold", "sleep", "checkpoint", "auto", "users")
STRATEGY = {"cold": "stop", "sleep": "sleep", "checkpoint": "checkpoint", "auto": "sleep"}
PLAN_PROMPT = "Plan a picture: one line naming its subject, setting and light."
JUDGE_PROMPT = "Judge this picture against the plan: does it match? Answer yes or no."


# ------------------------------------------------------------------ the configs


def mode_config(plan: Plan, mode: str) -> dict[str, Any]:
    """warm_proof's config for ``mode`` (``auto``: its sleep config with
    ``switchStrategy: auto`` and ``sleep.checkpoint``)."""
    cfg = config(plan, STRATEGY[mode])
    gpu = cfg["gpus"][0]
    gpu["name"] = "workflow"
    gpu["switching"] = {"mode": "onDemand"}  # the gateway's calls decide which model runs
    if mode == "auto":
        for m in gpu["models"].values():
            m["switchStrategy"] = "auto"
            m["sleep"]["checkpoint"] = True
    return cfg


# ------------------------------------------------------------------ the steps


def openai_client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900.0)


def chat(client: Any, prompt: str) -> str:
    r = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": prompt}], max_tokens=16)
    choice = r.choices[0]
    message = getattr(choice, "message", None)
    # The stand-in answers in the completions shape ({"text": ...}); vLLM in the chat shape.
    return str(getattr(message, "content", None) or (choice.model_extra or {}).get("text") or "")


def draw(client: Any, prompt: str, size: str, steps: int, seed: int) -> int:
    r = client.images.generate(
        model="sdxl", prompt=prompt, n=1, size=size, response_format="b64_json", extra_body={"steps": steps, "seed": seed}
    )
    return len(r.data[0].b64_json or "")


class Workflow:
    """plan -> draw -> judge, each step timed; ``around`` wraps each step
    (the users' way: start the model's server, call, stop it)."""

    def __init__(self, args: argparse.Namespace, client_for: Callable[[str], Any], around: Any = None) -> None:
        self.args, self.client_for, self.around = args, client_for, around

    def step(self, model: str, call: Callable[[Any], Any]) -> tuple[float, Any]:
        t0 = time.perf_counter()
        if self.around is None:
            out = call(self.client_for(model))
        else:
            with self.around(model) as client:
                out = call(client)
        return time.perf_counter() - t0, out

    def run(self, i: int) -> dict[str, Any]:
        a = self.args
        t0 = time.perf_counter()
        try:
            plan_s, idea = self.step("llm", lambda c: chat(c, PLAN_PROMPT))
            draw_s, nbytes = self.step("sdxl", lambda c: draw(c, f"{PLAN_PROMPT} {idea}"[:500], a.size, a.steps, 1000 + i))
            judge_s, verdict = self.step("llm", lambda c: chat(c, f"{JUDGE_PROMPT} ({nbytes} bytes of image)"))
        except Exception as err:
            return {"ok": False, "error": f"{type(err).__name__}: {err}"[:500], "seconds": time.perf_counter() - t0}
        return {
            "ok": True,
            "seconds": time.perf_counter() - t0,
            "steps": {"plan": plan_s, "draw": draw_s, "judge": judge_s},
            "image_b64_chars": nbytes,
            "answers": [idea[:80], verdict[:80]],
        }


def workflows(wf: Workflow, rounds: int, concurrent: int) -> dict[str, Any]:
    """``rounds`` workflows one after the other, then ``concurrent`` at once."""
    sequential = [wf.run(i) for i in range(rounds)]
    results: list[dict[str, Any]] = [{} for _ in range(concurrent)]

    def one(k: int) -> None:
        results[k] = wf.run(rounds + k)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = time.perf_counter() - t0
    return {"sequential": sequential, "concurrent": results, "concurrent_batch_seconds": batch if concurrent else None}


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """Medians and p95 of the workflows and of each step (the failed ones left out)."""
    ok = [w for w in r["sequential"] + r["concurrent"] if w.get("ok")]
    seq = [w for w in r["sequential"] if w.get("ok")]
    return {
        "ok": len(ok),
        "failed": len(r["sequential"]) + len(r["concurrent"]) - len(ok),
        "workflow_seconds": summary([w["seconds"] for w in seq]),
        "concurrent_workflow_seconds": summary([w["seconds"] for w in r["concurrent"] if w.get("ok")]),
        "concurrent_batch_seconds": r["concurrent_batch_seconds"],
        "step_seconds": {s: summary([w["steps"][s] for w in seq]) for s in ("plan", "draw", "judge")},
    }


# ------------------------------------------------------------------ servers without vramctl


class Server:
    """One model's server run directly, as a ModelManager does (vramctl's
    rendering of the same config gives its argv and environment)."""

    def __init__(self, cfg: dict[str, Any], model: str, log_dir: Path) -> None:
        from vramctl.spec.models import Config

        d = Config.model_validate(cfg).gpus[0]
        self.model, self.argv, self.port = model, d.process_argv(model), d.models[model].health.port  # type: ignore[union-attr]
        self.env = {**os.environ, **d.merged_env(model)}
        self.log = log_dir / f"users-{model}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600.0) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.model} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http("GET", f"http://127.0.0.1:{self.port}/health", timeout=1)[0] == 200:
                    return
            time.sleep(0.01)
        raise RuntimeError(f"{self.model} not healthy within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, 60)
        self.proc = None

    def client(self) -> Any:
        return openai_client(f"http://127.0.0.1:{self.port}/v1")


class UsersWay:
    """Start, call, stop around each step; one step on the GPU at a time."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.servers = servers
        self.lock = threading.Lock()
        self.starts = self.stops = 0
        self.start_seconds: dict[str, list[float]] = {m: [] for m in servers}

    @contextlib.contextmanager
    def __call__(self, model: str) -> Any:
        with self.lock:
            s = self.servers[model]
            t0 = time.perf_counter()
            s.start()
            self.starts += 1
            self.start_seconds[model].append(time.perf_counter() - t0)
            try:
                yield s.client()
            finally:
                s.stop()
                self.stops += 1


def run_users(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cfg = mode_config(plan, "cold")
    servers = {m: Server(cfg, m, workdir) for m in ("llm", "sdxl")}
    users = UsersWay(servers)
    try:
        r = workflows(Workflow(args, lambda m: None, around=users), args.rounds, args.concurrent)
    finally:
        for s in servers.values():
            s.stop()
    r["starts"], r["stops"] = users.starts, users.stops
    r["start_seconds"] = {m: summary(v) for m, v in users.start_seconds.items()}
    return r


def run_compute(plan: Plan, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Both servers started once and kept awake: the pure compute of each step."""
    cfg = mode_config(plan, "cold")
    servers = {m: Server(cfg, m, workdir) for m in ("llm", "sdxl")}
    clients: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        starts = [threading.Thread(target=s.start) for s in servers.values()]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        for m, s in servers.items():
            if s.proc is None or s.proc.poll() is not None:
                raise RuntimeError(f"{m} did not start for the compute run: {s.log.read_text()[-2000:]}")
            clients[m] = s.client()
        started = time.perf_counter() - t0
        wf = Workflow(args, clients.__getitem__)
        wf.run(-1)  # warm-up: the first call of each server (allocator, kernels) is not compute
        r = {"sequential": [wf.run(i) for i in range(args.rounds)], "concurrent": [], "concurrent_batch_seconds": None}
        r["both_started_seconds"] = started
        return r
    finally:
        for s in servers.values():
            s.stop()


# ------------------------------------------------------------------ through vramctl


def switches(sup: Supervisor, since: int) -> dict[str, Any]:
    """What vramctl did since progress entry ``since``: switch records and each kind of step."""
    sup.collect()
    entries = [p for p in sup.progress if p.get("seq", 0) > since]

    def count(step: str) -> int:
        return sum(1 for p in entries if p.get("step") == step)

    return {
        "switches": count("switch-started"),
        "starts": count("starting"),
        "stops": count("stopping"),
        "sleeps": count("sleeping"),
        "wakes": count("waking"),
        "fallbacks": [p.get("message") for p in entries if p.get("step") == "SleepFallback"],
        "ways": [p.get("message") for p in entries if p.get("step") == "way"],
        "ways_taken": {
            w: sum(1 for p in entries if p.get("step") == "way" and f" goes away by {w}:" in str(p.get("message")))
            for w in ("sleep", "checkpoint", "stop")
        },
    }


def run_vramctl(plan: Plan, mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gateway = free_port()
    sup = Supervisor(mode_config(plan, mode), workdir, f"workflow-{mode}", ("--gateway", f"127.0.0.1:{gateway}"))
    try:
        client = openai_client(f"http://127.0.0.1:{gateway}/v1")
        r = workflows(Workflow(args, lambda _m: client), args.rounds, args.concurrent)
        r["vramctl"] = switches(sup, 0)
        _, st = http("GET", sup.base + "/status")
        g = next(iter(st.get("gpus", {}).values()), {})
        r["asleep_modes"] = g.get("asleepModes")
        r["costs"] = g.get("costs")
        return r
    finally:
        sup.close()


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    dry = args.dry_run
    plan = Plan.of(args, 8192)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}: choose from {', '.join(MODES)}")
    result: dict[str, Any] = {
        "environment": environment(dry),
        "rounds": args.rounds,
        "concurrent": args.concurrent,
        "modes": modes,
        "image": {"size": args.size, "steps": args.steps},
        "plan": plan.__dict__,
    }
    print(f"environment: {result['environment']}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="vramctl-workflow-"))
    out = Path(args.out)

    def save() -> None:
        result["run_seconds"] = time.monotonic() - t0
        out.write_text(json.dumps(result, indent=2, default=str))

    compute = run_compute(plan, args, workdir)
    compute["figures"] = figures(compute)
    result["compute"] = compute
    pure = (compute["figures"]["workflow_seconds"] or {}).get("median_s")
    print(f"compute: {pure and round(pure, 3)} s per workflow (both models awake)", flush=True)
    save()
    for mode in modes:
        m0 = time.monotonic()
        r = run_users(plan, args, workdir) if mode == "users" else run_vramctl(plan, mode, args, workdir)
        r["figures"] = figures(r)
        wall = (r["figures"]["workflow_seconds"] or {}).get("median_s")
        r["overhead"] = wall / pure if wall is not None and pure else None
        r["mode_seconds"] = time.monotonic() - m0
        result[mode] = r
        save()
        print(f"{mode}: {json.dumps({'median_s': wall, 'overhead': r['overhead'], 'mode_s': r['mode_seconds']})}", flush=True)
    result["verdicts"] = verdicts(result)
    save()
    return result


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in r["modes"]:
        f = r[mode]["figures"]
        out[f"{mode}_all_workflows_ok"] = {"pass": f["failed"] == 0, "failed": f["failed"]}
    users = (r.get("users") or {}).get("figures", {}).get("workflow_seconds") or {}
    for mode in ("sleep", "checkpoint", "auto"):
        mine = (r.get(mode) or {}).get("figures", {}).get("workflow_seconds") or {}
        if users.get("median_s") and mine.get("median_s"):
            ratio = users["median_s"] / mine["median_s"]
            out[f"{mode}_faster_than_users"] = {"pass": ratio > 1, "ratio": ratio}
    return out


def report(r: dict[str, Any]) -> None:
    print("\nworkflow wall time (median s; overhead = over plan + draw + judge with both awake):")
    for mode in ["compute", *r["modes"]]:
        f = r[mode]["figures"]
        w = f["workflow_seconds"] or {}
        steps = {s: round((v or {}).get("median_s", float("nan")), 3) for s, v in f["step_seconds"].items()}
        extra = r[mode].get("vramctl") or {k: r[mode].get(k) for k in ("starts", "stops")}
        print(
            f"  {mode:10s} {w.get('median_s', float('nan')):8.2f}  overhead {r[mode].get('overhead') or 1.0:6.2f}x  steps {steps}  "
            f"batch {f['concurrent_batch_seconds']}  {({k: v for k, v in extra.items() if k not in ('ways', 'fallbacks')})}"
        )
    for name, v in r.get("verdicts", {}).items():
        print(f"  [{'PASS' if v['pass'] else 'FAIL'}] {name}: {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="sequential workflows per mode")
    p.add_argument("--concurrent", type=int, default=3, help="workflows at once per mode")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--dry-run", action="store_true", help="simulated GPU, the stand-in without torch, the tiny SDXL on the CPU")
    default_out = str(Path(os.environ["OUT"]) / "workflow_bench.json") if os.environ.get("OUT") else "workflow_bench.json"
    p.add_argument("--out", default=default_out, help="the JSON (written after each mode too)")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, help="SDXL denoising steps per image")
    p.add_argument("--size", default="512x512", help="SDXL image size, WxH (multiples of 8)")
    p.add_argument("--llm-weights-mib", type=int, default=None, help="the LLM stand-in's weights (default 8192; dry run 1024)")
    p.add_argument("--llm-kv-mib", type=int, default=1024)
    args = p.parse_args(argv)
    r = run(args)
    report(r)
    # The dry run's timings mean nothing (CPU, simulated GPU): only that every workflow went through counts.
    counted = [v for k, v in r["verdicts"].items() if not args.dry_run or k.endswith("_all_workflows_ok")]
    return 0 if all(v["pass"] for v in counted) else 1


if __name__ == "__main__":
    sys.exit(main())

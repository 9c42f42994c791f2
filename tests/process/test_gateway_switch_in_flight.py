"""Requests during a switch, through a live `vramctl up --gateway` (process
runtime): 20 clients of the official `openai` library stream chat answers
from model a while the GPU is switched under them -- a `POST /switch` to b
(queued behind the streams), a forced `POST /switch` back to a while b
loads, a forced one to b while a streams, and a SIGKILL of a's server
mid-stream.

Checked, from the records of each side:

- the backends (tests/support/request_log_standin.py) write down every
  request they receive and their own state then: none was sent to a server
  that was loading, asleep or stopping. A request that reached a stopping
  server is counted against the gateway when its client sent it after the
  server got its stop signal (it cannot have been in flight before);
- every client got a whole answer, an error that states the true reason (a
  forced switch: "vramctl stopped a ... switched to 'b'"; after the SIGKILL
  only: the backend died or failed), or a 503 with a Retry-After;
- the forced switch away meets streams mid-answer, by construction: LONG
  clients ask for a LONG_TOKENS answer (4 s) and the switch is forced only
  once each has received its first tokens. ``force`` switches at once, even
  away from a model in use (POST /switch: "switch now, even away from held
  models"; the queue: "force skips the drain"), so each of them gets the
  tokens so far and then the error that says why: "vramctl stopped a during
  this answer: ... switched to 'b'" -- never a whole answer, never a bare cut;
- each Retry-After R (whole seconds) against the wait W the client really
  had: from its 503 to a's next "healthy" in vramctl's own journal (0 when a
  was serving then). With Wc = max(1, ceil(W)) (the header's resolution and
  vramctl's minimum), ``Wc / 2 <= R <= 2 x Wc``: neither more than twice the
  real wait nor less than half of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.figures import report
from tests.support.live_up import LiveUp
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "support" / "request_log_standin.py"
CLIENTS = 20
PER_CLIENT = 40  # requests at most per client (the scenario's deadline ends them first)
TOKENS = 10
TOKEN_S = 0.1  # 1 s streams: longer than a stop (0.3 s), so a forced switch cuts some
WHOLE = "".join(f"tok{i} " for i in range(TOKENS))
LONG = 2  # clients whose answers are still streaming when the switch away is forced
LONG_TOKENS = 40  # 4 s answers: a forced switch (a 0.3 s stop) cuts them whatever the machine's load


def model(port: int, log: Path) -> dict[str, Any]:
    return {
        "command": [sys.executable, str(SCRIPT)],
        "vramMiB": 11000,
        "env": {
            "STANDIN_PORT": str(port),
            "STANDIN_LOAD_SECONDS": "0.5",
            "STANDIN_STOP_SECONDS": "0.3",
            "STANDIN_TOKEN_SECONDS": str(TOKEN_S),
            "STANDIN_KEEPALIVE": "1",
            "STANDIN_REQUEST_LOG": str(log),
        },
        "health": {"path": "/health", "port": port, "intervalSeconds": 0.05},
        "stop": {"gracePeriodSeconds": 3},
        "startTimeoutSeconds": 20,
    }


@dataclass
class Outcome:
    tag: str
    sent: float
    done: float = 0.0
    kind: str = ""  # whole | error | 503 | bad
    status: int | None = None
    retry_after: int | None = None
    message: str = ""
    text: str = ""  # what the client received before the end
    first_token: float = 0.0  # when its first token came


def long_client(gw: str, tag: str, first: threading.Event, o: Outcome) -> None:
    """One LONG_TOKENS answer from a; ``first`` is set once its first token came (or it ended without one)."""
    client = openai.OpenAI(base_url=gw, api_key="unused", max_retries=0, timeout=20)
    try:
        stream = client.chat.completions.create(
            model="model-a", messages=[{"role": "user", "content": tag}], max_tokens=LONG_TOKENS, stream=True
        )
        for ch in stream:
            o.text += "".join(c.delta.content or "" for c in ch.choices)
            if o.text and not first.is_set():
                o.first_token = time.time()
                first.set()
        whole = "".join(f"tok{i} " for i in range(LONG_TOKENS))
        o.kind, o.message = ("whole", "") if o.text == whole else ("bad", f"cut answer without an error: {o.text!r}")
    except openai.APIStatusError as err:
        o.kind, o.status, o.message = "error", err.status_code, err.message
    except openai.APIConnectionError as err:
        o.kind, o.message = "bad", f"{type(err).__name__}: {err}"
    except openai.APIError as err:  # the SSE error event mid-stream
        o.kind, o.message = "error", err.message
    o.done = time.time()
    first.set()


@dataclass
class Journal:
    """vramctl's progress notes (``/status?since=``), polled so none is lost to the bounded deque."""

    url: str
    notes: dict[int, dict[str, Any]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> None:
        since = max(self.notes, default=0)
        with urllib.request.urlopen(f"{self.url}/status?since={since}", timeout=5) as r:
            for p in json.loads(r.read()).get("progress", []):
                self.notes[int(p["seq"])] = p

    def run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError):
                self.poll()

    def steps(self, step: str, model: str) -> list[float]:
        return sorted(p["time"] for p in self.notes.values() if p["step"] == step and p["model"] == model)

    def wait_for(self, step: str, model: str, after: float, timeout: float = 20) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            later = [t for t in self.steps(step, model) if t >= after]
            if later:
                return later[0]
            time.sleep(0.05)
        raise AssertionError(f"no {step!r} of {model!r} after {after} within {timeout}s: {sorted(self.notes.items())[-15:]}")


def switch(v: LiveUp, model: str, force: bool = False) -> tuple[int, Any]:
    return v.post({"model": model, "force": force})


def client_loop(gw: str, c: int, stop: threading.Event, out: list[Outcome]) -> None:
    client = openai.OpenAI(base_url=gw, api_key="unused", max_retries=0, timeout=20)
    for n in range(PER_CLIENT):
        if stop.is_set():
            return
        o = Outcome(f"c{c}-{n}", time.time())
        out.append(o)
        try:
            stream = client.chat.completions.create(
                model="model-a", messages=[{"role": "user", "content": o.tag}], max_tokens=TOKENS, stream=True
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            o.kind, o.message = ("whole", "") if text == WHOLE else ("bad", f"cut answer without an error: {text!r}")
        except openai.APIStatusError as err:
            o.status = err.status_code
            ra = err.response.headers.get("retry-after")
            o.retry_after = int(ra) if ra is not None and ra.isdigit() else None
            o.message = err.message
            o.kind = "503" if err.status_code == 503 and o.retry_after is not None else "error"
        except openai.APIConnectionError as err:  # the connection dropped or timed out: no reason given
            o.kind, o.message = "bad", f"{type(err).__name__}: {err}"
        except openai.APIError as err:  # an SSE error event mid-stream
            o.kind, o.message = "error", err.message
        o.done = time.time()
        # A client that got a Retry-After comes back later (bounded), others at once.
        stop.wait(min(o.retry_after or 0, 2) or 0.02)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_requests_during_switches_force_and_a_killed_backend(live: list[LiveUp], tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    ports = {"a": free_port(), "b": free_port()}
    models = {m: {**model(ports[m], log), "servedModelName": f"model-{m}"} for m in ports}
    cfg = {
        "runtime": "process",
        "gpuProbe": {"kind": "simulated", "releaseDelaySeconds": 0.05},
        "backoffInitialSeconds": 0.5,
        "gpus": [
            {
                "gpu": 0,
                "activeModel": "a",
                "vramBudgetMiB": 15000,
                "queue": {"maxServeSeconds": 3, "drainTimeoutSeconds": 1},
                "switching": {"mode": "onDemand"},
                "models": models,
            }
        ],
    }
    v = LiveUp(tmp_path, cfg)
    live.append(v)
    gw_port = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gw_port}"]
    t_begin = time.monotonic()
    v.start()
    journal = Journal(v.url)
    # The cost book learns each way once (a's and b's stops and starts): its predictions are the learned costs.
    for m in ("b", "a"):
        assert switch(v, m)[0] == 202
        v.wait(lambda g, m=m: g["phase"] == "Ready" and g["activeModel"] == m and g["runningModels"] == [m], timeout=30)

    gw = f"http://127.0.0.1:{gw_port}/v1"
    stop = threading.Event()
    outcomes: list[list[Outcome]] = [[] for _ in range(CLIENTS)]
    threads = [threading.Thread(target=client_loop, args=(gw, c, stop, outcomes[c]), daemon=True) for c in range(CLIENTS)]
    poller = threading.Thread(target=journal.run, daemon=True)
    poller.start()
    events: dict[str, float] = {}
    longs: list[Outcome] = []
    long_threads: list[threading.Thread] = []
    t_clients = time.time()
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        events["switch b"] = time.time()
        assert switch(v, "b")[0] == 202  # queued behind the streams (or at once): either way no stream is cut
        journal.wait_for("starting", "b", events["switch b"])
        events["force a"] = time.time()
        assert switch(v, "a", force=True)[0] == 202  # back while b loads
        back = journal.wait_for("healthy", "a", events["force a"])
        # The queued switch to b keeps its turn (superseded, not served): b runs once, then a's clients bring a back.
        back = journal.wait_for("healthy", "a", journal.wait_for("healthy", "b", back))
        time.sleep(1.0)
        # Streams mid-answer when the switch away is forced: LONG clients, each past its first token.
        for k in range(LONG):
            first = threading.Event()
            lo = Outcome(f"long-{k}", time.time())
            longs.append(lo)
            t = threading.Thread(target=long_client, args=(gw, lo.tag, first, lo), daemon=True)
            long_threads.append(t)
            t.start()
            assert first.wait(15), f"{lo.tag}: no first token within 15 s"
            assert lo.first_token and not lo.done, f"{lo.tag} ended before its first token: {lo.kind} {lo.status} {lo.message}"
        events["force b"] = time.time()
        assert switch(v, "b", force=True)[0] == 202  # away from a mid-stream: its streams are cut
        journal.wait_for("healthy", "a", events["force b"])  # a's waiting clients bring it back
        time.sleep(1.0)
        started = [r for r in read_log(log) if r.get("event") == "started" and r["model"] == "a"]
        pid = started[-1]["pid"]
        events["kill a"] = time.time()
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        journal.wait_for("healthy", "a", events["kill a"])
        time.sleep(1.5)
    finally:
        stop.set()
        for t in [*threads, *long_threads]:
            t.join(30)
        journal._stop.set()
        poller.join(5)
    journal.poll()
    took = time.monotonic() - t_begin
    assert not [t for t in [*threads, *long_threads] if t.is_alive()], "a client did not finish"

    every = [o for per in outcomes for o in per] + longs
    by_tag = {o.tag: o for o in every}
    # -- the backends' side: nothing proxied to a server that was not ready
    received = [r for r in read_log(log) if "path" in r and r.get("tag", "").startswith(("c", "long-"))]
    stop_signal = {r["pid"]: r["t"] for r in read_log(log) if r.get("event") == "stop-signal"}
    wrong = []
    cut_in_flight = 0
    for r in received:
        if r["state"] in ("loading", "asleep", "sleeping", "waking"):
            wrong.append(r)
        elif r["state"] == "stopping":
            o = by_tag.get(r["tag"])
            if o is not None and o.sent > stop_signal.get(r["pid"], math.inf):
                wrong.append(r)  # sent by its client after the server's stop began: the gateway knew
            else:
                cut_in_flight += 1
    assert not wrong, f"requests proxied to a server not ready: {wrong[:5]}"

    # -- the clients' side: three outcomes, each with its true reason
    healthy_a = journal.steps("healthy", "a")
    away_a = sorted([*journal.steps("stopping", "a"), *journal.steps("failed", "a"), events["kill a"]])
    bad: list[Outcome] = []
    waits: list[tuple[int, float]] = []
    for o in every:
        if o.kind == "whole":
            continue
        if o.kind == "bad":
            bad.append(o)
        elif o.kind == "503":
            waits.append((o.retry_after or 0, wait_for_a(o.done, healthy_a, away_a)))
        elif "vramctl stopped a" in o.message:
            if not ("switched to 'b'" in o.message and o.done >= events["switch b"]):
                bad.append(o)
        elif "died" in o.message or "failed" in o.message:
            if o.sent < events["kill a"] - 0.5 and o.done < events["kill a"]:  # a died only at the SIGKILL
                bad.append(o)
        else:
            bad.append(o)
    assert not bad, [(o.tag, o.kind, o.status, o.message) for o in bad[:8]]
    assert not [o for o in every if o.kind == "503" and o.retry_after is None]

    # -- the streams mid-answer at the forced switch: their tokens so far, then the true reason
    long_whole = "".join(f"tok{i} " for i in range(LONG_TOKENS))
    assert len(longs) == LONG
    for o in longs:
        assert o.first_token < events["force b"] and o.text and long_whole.startswith(o.text) and o.text != long_whole, (o.tag, o.text)
        assert o.kind == "error" and "vramctl stopped a during this answer" in o.message and "switched to 'b'" in o.message, (
            o.tag,
            o.kind,
            o.status,
            o.message,
        )
        assert events["force b"] <= o.done <= events["force b"] + 5, (o.tag, o.done - events["force b"])

    # -- Retry-After against the real wait, at the header's resolution (whole seconds, at least 1)
    off = [(r, round(w, 2)) for r, w in waits if not (max(1, math.ceil(w)) / 2 <= r <= 2 * max(1, math.ceil(w)))]
    assert not off, f"Retry-After (s) vs the real wait (s) beyond 2x: {off[:8]}"

    if os.environ.get("SWITCH_IN_FLIGHT_DEBUG"):
        for o in every:
            if o.kind != "whole":
                print(o.tag, round(o.sent - t_clients, 2), round(o.done - t_clients, 2), o.kind, o.status, o.retry_after, o.message)
        print({k: round(t - t_clients, 2) for k, t in events.items()})
        for _, n in sorted(journal.notes.items()):
            print("journal", round(n["time"] - t_clients, 2), n["step"], n["model"], n["message"][:100])
    counts = {k: sum(1 for o in every if o.kind == k) for k in ("whole", "error", "503")}
    last = v.gpu().get("lastSwitch") or {}
    ra = sorted({r for r, _ in waits})
    report(
        f"[gateway switch in flight] {CLIENTS} openai clients, {len(every)} streamed requests in {time.time() - t_clients:.1f}s "
        f"(switch, force back mid-load, force away mid-stream, SIGKILL): {counts['whole']} whole, {counts['error']} errors "
        f"with their reason, {counts['503']} 503s; {len(longs)} streams mid-answer at the forced switch away, each cut "
        f"after {'/'.join(str(o.text.count('tok')) for o in longs)} tokens with the true reason "
        f"{max(o.done - events['force b'] for o in longs):.2f}s after it; Retry-After {ra} s vs real waits "
        f"{min((w for _, w in waits), default=0):.2f}-{max((w for _, w in waits), default=0):.2f} s (last switch "
        f"{last.get('durationSeconds', 0):.2f} s); {len(received)} requests at the backends, 0 to a server not ready, "
        f"{cut_in_flight} in flight when their server began stopping; test {took:.0f}s"
    )


def wait_for_a(at: float, healthy: list[float], away: list[float]) -> float:
    """Seconds from ``at`` until a serves: 0 if it was healthy then (its last
    healthy before ``at`` came after its last stop, failure or kill)."""
    before = [t for t in healthy if t <= at]
    gone = [t for t in away if t <= at]
    if before and (not gone or before[-1] > gone[-1]):
        return 0.0
    later = [t for t in healthy if t > at]
    return later[0] - at if later else math.inf

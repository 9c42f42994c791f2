"""The ``vramctl`` command line.

``vramctl up``      run the supervisor in the foreground (embedded demo by default)
``vramctl down``    stop everything an instance runs (its ``up`` first), sleepers too; remove its containers
``vramctl switch``  ask it for another model, following the switch step by step
``vramctl status``  what holds each GPU
``vramctl validate`` check a config file; exit 2 with every problem named, WARN lines for pitfalls (exit 0)
``vramctl doctor``  check this machine for a config (NVML, GPUs, WSL2, Docker, pitfalls); exit 1 on a FAIL
``vramctl operator`` the Kubernetes operator of one node (ModelDeployment resources)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramctl import __version__
from vramctl.spec.models import Config, ConfigError, DeploymentSpec, DesiredStateError, check_desired, load_config
from vramctl.spec.pitfalls import Finding, env_pitfalls

if TYPE_CHECKING:
    from vramctl.web.api import StateStore
    from vramctl.web.server import Face, FaceOptions
    from vramctl.worker.supervisor import Supervisor

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_LISTEN = "127.0.0.1:9400"


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _base_url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("VRAMCTL_URL") or f"http://{DEFAULT_LISTEN}"
    return url.rstrip("/")


def _request(url: str, method: str = "GET", body: Any = None, token: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except ValueError:
            return err.code, {"error": err.reason}


# ----------------------------------------------------------------- commands


def _known_total(config: Config) -> int | None:
    """The GPU's total as the config states it: only for a simulated GPU (or one the user sized)."""
    p = config.gpu_probe
    return p.total_mib if p.kind == "simulated" or "total_mib" in p.model_fields_set else None


def config_findings(config: Config) -> list[tuple[str, Finding]]:
    """Everything ``validate`` finds beyond parsing: pitfalls (warnings) and
    desired states that cannot fit (errors). ``up`` refuses on the same errors."""
    total = _known_total(config)
    findings: list[tuple[str, Finding]] = []
    for i, d in enumerate(config.gpus):
        findings += [(f"gpus[{i}].", f) for f in env_pitfalls(d, total)]
        if total is not None:
            # Parsing checked the budget without the total; a vLLM model's reservation needs it.
            try:
                check_desired(d, d.active_model, d.companions, total)
            except DesiredStateError as err:
                findings.append((f"gpus[{i}].", Finding("error", err.field or "companions", str(err))))
    return findings


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    total = _known_total(config)
    for d in config.gpus:
        members = ", ".join(_describe_model(d, n, total) for n in d.models)
        print(f"{args.file}: gpu {d.gpu} ({d.display_name}): active {d.active_model or '(none)'}; models: {members}")
    findings = config_findings(config)
    for prefix, f in findings:
        print(f.render(prefix))
    if any(f.severity == "error" for _, f in findings):
        return EXIT_USAGE
    warnings = len(findings)
    print("ok" + (f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""))
    return EXIT_OK


def _describe_model(d: DeploymentSpec, name: str, total_mib: int | None) -> str:
    m = d.models[name]
    r = d.reservation(name, total_mib)
    engine = "" if m.engine == "container" else f", {m.engine}"
    size = "? MiB" if r is None else f"{r.mib} MiB" + (f" = {r.formula}" if r.formula else "")
    return f"{name} ({m.model_class}{engine}, {size})"


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check (OK/WARN/FAIL + the fix); exit 1 when a FAIL stops the main job."""
    from vramctl import doctor

    config: Config | ConfigError
    if args.config:
        source = args.config
        try:
            config = load_config(args.config)
        except ConfigError as err:
            config = err
    else:
        from vramctl.demo.config import demo_config

        source, config = "embedded demo config", demo_config()
    if args.kubernetes:
        if not args.node_name:
            print("vramctl doctor --kubernetes: the node name is required: --node-name or NODE_NAME", file=sys.stderr)
            return EXIT_USAGE
        found = doctor.kubernetes_checks(doctor.gather_kubernetes(args.node_name, args.runtime_class, args.pod_gpu, args.kubeconfig))
    else:
        found = doctor.checks(doctor.gather(config, source))
    rc = doctor.exit_code(found)
    if args.json:
        print(json.dumps({"ok": rc == 0, "checks": [c.as_dict() for c in found]}, indent=2))
    else:
        for c in found:
            print(c.render())
    return rc


def _load(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    from vramctl.demo.config import demo_config

    print("vramctl: no --config given: running the embedded demo stack (stand-in model servers)", file=sys.stderr)
    return demo_config()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard one: a flood of
    client connections must not leave the supervisor's own health checks and
    state writes without a descriptor (EMFILE). Returns (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:
            logging.getLogger("vramctl").warning("could not raise the open-file limit from %d to %d: %s", soft, hard, err)
    return soft, hard


def cmd_up(args: argparse.Namespace) -> int:
    from vramctl.app import build, default_state_path, settle_heap
    from vramctl.sources.statefile import StateWriteError
    from vramctl.web.server import FaceOptions

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_nofile_limit()
    try:
        config = _load(args)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    # The same verdict as `vramctl validate`: a config it refuses never runs.
    errors = [(prefix, f) for prefix, f in config_findings(config) if f.severity == "error"]
    if errors:
        print(f"{args.config or 'embedded demo config'}: {len(errors)} problem(s); `vramctl validate` says the same", file=sys.stderr)
        for prefix, f in errors:
            print(f.render(prefix), file=sys.stderr)
        return EXIT_USAGE
    state_path = Path(args.state) if args.state else default_state_path()
    try:
        built = build(config, state_path, instance=args.instance)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    except StateWriteError as err:
        print(f"vramctl: {err}: choose a writable place with --state", file=sys.stderr)
        return EXIT_USAGE
    host, port = args.listen
    token = args.token or os.environ.get("VRAMCTL_TOKEN") or None
    options = FaceOptions(
        api=(host, port),
        gateway=args.gateway or None,
        token=token,
        allowed_hosts=tuple(args.allow_host or ()),
    )
    face = _serve(built.supervisor, options, state=built.state)
    if face is None:
        return EXIT_USAGE
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    api = face.api
    try:
        built.state.write_supervisor({"pid": os.getpid(), "url": f"http://{api.host}:{api.port}", "startedAt": time.time()})
    except StateWriteError as err:
        print(f"vramctl: {err}: choose a writable place with --state", file=sys.stderr)
        face.stop()
        built.supervisor.runtime.close()
        return EXIT_USAGE
    face.start()
    built.supervisor.start()
    settle_heap()
    for note in built.supervisor.notes:
        print(f"vramctl: {note}", file=sys.stderr)
    print(
        f"vramctl: listening on http://{api.host}:{api.port} (page: /, status: /status, events: /events, metrics: /metrics)",
        file=sys.stderr,
        flush=True,
    )
    _say_gateway(face)
    if args.once:
        for w in built.supervisor.workers.values():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and w.status()["observedGeneration"] < w.desired.generation:
                time.sleep(0.1)
        done.set()
    done.wait()
    face.stop()
    _stop_supervisor(built.supervisor, keep_models=args.keep_models)
    try:
        built.state.write_supervisor(None)
    except StateWriteError as err:
        print(f"vramctl: {err}", file=sys.stderr)
    return EXIT_OK


def _stop_supervisor(supervisor: Supervisor, keep_models: bool) -> None:
    """Stop the workers; then, for the process runtime unless ``keep_models``,
    the models (their children), sleepers included, each said. Docker's
    containers outlive vramctl as compose's do (``vramctl down`` ends them)."""
    from vramctl.runtimes.teardown import take_down

    if keep_models or supervisor.runtime.kind != "process":
        why = "--keep-models" if keep_models else f"the {supervisor.runtime.kind} runtime"
        print(f"vramctl: shutting down; models keep running ({why}); `vramctl down` stops them", file=sys.stderr, flush=True)
        supervisor.stop()
        return
    print("vramctl: shutting down: stopping the models (`vramctl up --keep-models` keeps them for the next up)", file=sys.stderr, flush=True)
    for w in supervisor.workers.values():
        w.stop()  # nothing starts a model again behind the teardown
    for t in take_down(supervisor.runtime, [w.spec for w in supervisor.workers.values()], remove_created=False):
        print(f"vramctl: gpu{t.gpu}: {t.said}", file=sys.stderr, flush=True)
    supervisor.stop()


def cmd_down(args: argparse.Namespace) -> int:
    """Stop everything this instance runs (a running ``vramctl up`` first),
    sleepers included; remove the containers vramctl created; say what was done."""
    from vramctl.app import build_runtime, default_state_path
    from vramctl.host.procfs import read_stat
    from vramctl.runtimes.teardown import take_down
    from vramctl.sources.statefile import StateFile, running_supervisor

    try:
        config = _load(args)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_USAGE
    state_path = Path(args.state) if args.state else default_state_path()
    notes: list[str] = []
    runtime = build_runtime(config, state_path.parent, args.instance, notes)
    try:
        before = {(d.gpu, m): w.ref for d in config.gpus for m, w in runtime.observe(d).items() if w.state.live}
        pid = running_supervisor(StateFile(state_path))
        if pid is not None:
            first = read_stat(pid)

            def runs() -> bool:  # the same process, not exited (a reused pid has another start time)
                st = read_stat(pid)
                return st is not None and first is not None and not st.exited and st.start_ticks == first.start_ticks

            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and runs():
                time.sleep(0.05)
            if runs():
                print(f"vramctl down: vramctl up (pid {pid}) still runs {args.timeout:.0f}s after SIGTERM; nothing else done", file=sys.stderr)
                return EXIT_FAIL
            print(f"stopped vramctl up (pid {pid})")
        taken = take_down(runtime, config.gpus, remove_created=runtime.kind == "docker")
    finally:
        runtime.close()
    said = {(t.gpu, t.model) for t in taken}
    kind = "pid" if runtime.kind == "process" else runtime.kind
    for (gpu, model), ref in sorted(before.items()):
        if (gpu, model) not in said:
            print(f"gpu{gpu}: stopped {model} ({kind} {ref[:12]}): by vramctl up as it shut down")
    for t in taken:
        print(f"gpu{t.gpu}: {t.said}")
    if not taken and not before and pid is None:
        print(f"nothing runs for instance {args.instance!r}")
    return EXIT_FAIL if any(t.said.startswith("could not") for t in taken) else EXIT_OK


def _serve(supervisor: Supervisor, options: FaceOptions, state: StateStore | None = None) -> Face | None:
    """The face of ``up`` and ``operator``, bound: ``options`` plus the status
    page and one /metrics rendering shared by concurrent scrapes; None (said,
    the runtime closed) when it cannot bind."""
    from vramctl.telemetry import SharedRendering
    from vramctl.web.page import status_page
    from vramctl.web.server import serve

    page = status_page(supervisor, refusal=options.switch_refusal, token_set=options.token is not None)
    options = replace(options, api_routes=(*options.api_routes, page), metrics_body=SharedRendering(supervisor.metrics.registry))
    try:
        return serve(supervisor, options, state=state)
    except (ValueError, OSError) as err:
        print(f"vramctl: {err}", file=sys.stderr)
        supervisor.runtime.close()
        return None


def _say_gateway(face: Face) -> None:
    gw = face.gateway
    if gw is not None:
        print(f"vramctl: gateway on http://{gw.host}:{gw.port} (/v1/..., /models/NAME/..., /holds)", file=sys.stderr, flush=True)


def _print_progress(p: dict[str, Any]) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(p["time"])) + f".{int(p['time'] * 1000) % 1000:03d}"
    print(f"{stamp}  gpu{p['gpu']}  {p['step']:<15} {p['message']}", flush=True)


def cmd_switch(args: argparse.Namespace) -> int:
    base = _base_url(args)
    token = args.token or os.environ.get("VRAMCTL_TOKEN") or None
    body: dict[str, Any] = {"model": args.model or None}
    if args.companions is not None:
        body["companions"] = [c for c in args.companions.split(",") if c]
    if args.gpu is not None:
        body["gpu"] = args.gpu
    if args.force:
        body["force"] = True
    # Followed from before the request, so that no step of the switch is missed.
    events = _open_events(base, min(_EVENT_READ_TIMEOUT, args.timeout + 1)) if args.wait else None
    try:
        status, reply = _request(base + "/switch", "POST", body, token)
    except (urllib.error.URLError, OSError) as err:
        _close(events)
        print(f"vramctl: no supervisor answers at {base} ({err}); start one with `vramctl up`", file=sys.stderr)
        return EXIT_FAIL
    if status != 202:
        _close(events)
        field = f" [{reply.get('field')}]" if isinstance(reply, dict) and reply.get("field") else ""
        print(f"vramctl: switch refused{field}: {reply.get('error') if isinstance(reply, dict) else reply}", file=sys.stderr)
        return EXIT_USAGE if status in (400, 404, 422) else EXIT_FAIL
    if reply.get("queued"):
        return _wait_queued(base, args, reply, events)
    gpu, gen, seq = reply["gpu"], reply["generation"], reply["progressSeq"]
    target = reply["activeModel"] or "(no model)"
    if not args.wait:
        print(f"switch to {target} requested on gpu {gpu} (generation {gen})")
        return EXIT_OK

    def ended(g: dict[str, Any]) -> int | None:
        if g["desiredGeneration"] > gen:
            print(f"vramctl: superseded by a newer request (generation {g['desiredGeneration']})", file=sys.stderr)
            return EXIT_FAIL
        if g["observedGeneration"] >= gen and g["phase"] != "Switching":
            phase = g["phase"]
            if phase in ("Ready", "Idle"):
                last = g.get("lastSwitch") or {}
                took = (
                    f" in {last['durationSeconds']:.2f}s"
                    if last.get("generation") == gen and last.get("durationSeconds") is not None
                    else ""
                )
                print(f"{target} holds gpu {gpu}{took}: {phase}")
                return EXIT_OK
            print(f"vramctl: switch to {target} ended {phase}: {g['message']}", file=sys.stderr)
            return EXIT_FAIL
        return None

    rc, g = _wait_for(base, events, gpu, seq, args.timeout, ended)
    if rc is not None:
        return rc
    print(f"vramctl: timed out after {args.timeout:.0f}s; phase {(g or {}).get('phase')}: {(g or {}).get('message')}", file=sys.stderr)
    return EXIT_FAIL


_EVENT_READ_TIMEOUT = 30.0  # the stream sends a comment every 15 s while nothing happens


def _open_events(base: str, timeout: float = _EVENT_READ_TIMEOUT, last_id: int | None = None) -> Any | None:
    """``GET /events`` open (its first event not read yet), or None when this
    supervisor serves no event stream or does not answer: then the caller polls."""
    req = urllib.request.Request(base + "/events", headers={"Accept": "text/event-stream"})
    if last_id is not None:
        req.add_header("Last-Event-ID", str(last_id))
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        resp.close()
        return None
    return resp


def _close(stream: Any | None) -> None:
    if stream is not None:
        stream.close()


def _read_events(stream: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, its JSON data) per Server-Sent Event as it arrives; a
    comment (the stream's keep-alive) yields ("", {}) so the reader looks at
    its clock. Ends with the stream; raises OSError when it breaks."""
    kind, data = "message", list[str]()
    for raw in stream:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", list[str]()
        elif line.startswith(":"):
            yield "", {}
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


def _follow(
    stream: Any | None, gpu: int, seq: int, deadline: float, ended: Callable[[dict[str, Any]], int | None]
) -> tuple[int | None, int, dict[str, Any] | None]:
    """Follow ``gpu`` on the event stream: print its progress after ``seq``
    (as the polling of /status does), ask ``ended`` at each of its statuses.
    (``ended``'s exit code, or None when the stream ended, broke or the
    deadline passed; the last seq printed; the last status seen). Closes the stream."""
    if stream is None:
        return None, seq, None
    last: dict[str, Any] | None = None
    try:
        for kind, doc in _read_events(stream):
            g: dict[str, Any] | None = None
            if kind == "hello":
                g = ((doc.get("gpus") or {}).get(str(gpu)) or {}).get("status")
            elif kind == "status" and doc.get("gpu") == gpu:
                g = doc["data"]
            elif kind == "progress" and doc.get("gpu") == gpu and doc["data"]["seq"] > seq:
                _print_progress(doc["data"])
                seq = doc["data"]["seq"]
            if g:
                last = g
                rc = ended(g)
                if rc is not None:
                    return rc, seq, last
            if time.monotonic() > deadline:
                break
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the stream broke: the caller polls from ``seq``
    finally:
        stream.close()
    return None, seq, last


def _wait_for(
    base: str, events: Any | None, gpu: int, seq: int, timeout: float, ended: Callable[[dict[str, Any]], int | None]
) -> tuple[int | None, dict[str, Any] | None]:
    """Follow ``gpu`` until ``ended`` gives an exit code: on the event
    stream (``_follow``), then, with no stream (an older vramctl) or after it
    broke, by polling /status. (That code, or None when ``timeout`` passed;
    the last status seen.)"""
    deadline = time.monotonic() + timeout
    rc, seq, g = _follow(events, gpu, seq, deadline, ended)
    while rc is None and time.monotonic() <= deadline:
        polled = _poll(base, gpu, seq)
        if polled is None:
            return EXIT_FAIL, g
        g, seq = polled
        rc = ended(g)
        if rc is None:
            time.sleep(0.1)
    return rc, g


def _poll(base: str, gpu: int, seq: int) -> tuple[dict[str, Any], int] | None:
    """One look at /status: print the GPU's new progress; (its status, the last seq seen), or None when the supervisor is gone."""
    try:
        _, st = _request(f"{base}/status?since={seq}")
    except (urllib.error.URLError, OSError) as err:
        print(f"vramctl: lost the supervisor at {base}: {err}", file=sys.stderr)
        return None
    for p in st.get("progress", []):
        if p["gpu"] == gpu:
            _print_progress(p)
            seq = max(seq, p["seq"])
    return st["gpus"][str(gpu)], seq


def _wait_queued(base: str, args: argparse.Namespace, reply: dict[str, Any], events: Any | None = None) -> int:
    """A switch queued behind live holds (use --force to cut them): it comes
    when they end or the drain times out."""
    gpu, target, seq = reply["gpu"], reply["activeModel"], reply["progressSeq"]
    print(f"switch to {target} queued on gpu {gpu}: {reply['holds']} hold(s) on the running model drain first (--force cuts them)")
    if not args.wait:
        _close(events)
        return EXIT_OK

    def ended(g: dict[str, Any]) -> int | None:
        if g["activeModel"] == target and g["phase"] == "Ready" and g["observedGeneration"] >= g["desiredGeneration"]:
            print(f"{target} holds gpu {gpu}: Ready")
            return EXIT_OK
        return None

    rc, _ = _wait_for(base, events, gpu, seq, args.timeout, ended)
    if rc is not None:
        return rc
    print(f"vramctl: timed out after {args.timeout:.0f}s waiting for the queued switch to {target}", file=sys.stderr)
    return EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    base = _base_url(args)
    try:
        _, st = _request(base + "/status")
    except (urllib.error.URLError, OSError) as err:
        if args.state and Path(args.state).exists() and not args.watch:
            from vramctl.sources.statefile import StateFile

            recorded = StateFile(args.state)
            doc = recorded.read()
            if recorded.problem() is not None:
                print(f"vramctl: no supervisor answers at {base}, and {recorded.problem()}", file=sys.stderr)
                return EXIT_FAIL
            st = {"gpus": {g: v.get("status", {}) for g, v in doc["gpus"].items() if isinstance(v, dict)}, "stale": True}
        else:
            print(f"vramctl: no supervisor answers at {base} ({err})", file=sys.stderr)
            return EXIT_FAIL
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    for gpu, g in st["gpus"].items():  # first: nothing below is known while the engine is away
        if g.get("phase") == "Unknown":
            print(f"runtime unreachable (gpu {gpu}): {g.get('message')}", flush=True)
    if st.get("stale"):
        print("(supervisor not running: last recorded status)")
    for note in st.get("notes", []):
        print(f"note: {note}")
    for gpu, g in st["gpus"].items():
        _print_gpu(gpu, g)
    if args.watch:
        return _watch(base, {gpu: _summary(g) for gpu, g in st["gpus"].items()})
    return EXIT_OK


def _summary(g: dict[str, Any]) -> tuple[Any, ...]:
    """What the one-line view of a GPU shows: a change of it is printed by --watch."""
    q = g.get("queue") or {}
    return (
        g.get("phase"),
        g.get("activeModel"),
        tuple(g.get("runningModels") or ()),
        tuple(g.get("asleepModels") or ()),
        json.dumps(g.get("lastSwitch"), sort_keys=True),
        json.dumps(q.get("holds"), sort_keys=True),
        json.dumps(q.get("waiting"), sort_keys=True),
        g.get("message"),
    )


def _print_gpu(gpu: str, g: dict[str, Any]) -> None:
    last = g.get("lastSwitch") or {}
    lasts = (
        f"; last switch {last.get('from') or '-'} -> {last.get('to') or '-'} {last.get('outcome')} in {last.get('durationSeconds')}s"
        if last
        else ""
    )
    running = "unknown" if g.get("phase") == "Unknown" else (",".join(g.get("runningModels", [])) or "-")
    print(
        f"gpu {gpu}: {g.get('phase')}  active={g.get('activeModel') or '-'}  running={running}"
        + (f"  asleep={','.join(g['asleepModels'])}" if g.get("asleepModels") else "")
        + lasts,
        flush=True,
    )
    if g.get("message"):
        print(f"  {g['message']}", flush=True)
    q = g.get("queue") or {}
    if q.get("holds") or q.get("queueDepth"):
        holds = ", ".join(f"{m} x{n}" for m, n in sorted((q.get("holds") or {}).items())) or "none"
        waiting = ", ".join(f"{m} x{n}" for m, n in sorted((q.get("waiting") or {}).items())) or "none"
        drain = "; draining for a switch" if q.get("draining") else ""
        print(f"  holds: {holds}; waiting: {waiting}{drain}", flush=True)
    for w in g.get("configWarnings") or []:
        print(f"  {'ERROR' if w.get('severity') == 'error' else 'WARN'} {w.get('path')}: {w.get('message')}", flush=True)


_WATCH_RECONNECTS = 20  # a supervisor gone for longer than this many tries (about 1 s apart) ends --watch


def _watch(base: str, shown: dict[str, tuple[Any, ...]]) -> int:
    """``status --watch``: every step as it happens, and a GPU's status again
    when what its line shows changed; from ``GET /events``, resumed after a
    break with the last id seen (polling ``/status`` where no event stream
    is served). Ends with Ctrl-C (0) or when the supervisor stays away (1)."""
    last_id: int | None = None
    misses = 0
    try:
        while misses < _WATCH_RECONNECTS:
            stream = _open_events(base, last_id=last_id)
            if stream is None:
                if _poll_once(base, shown) is None:
                    misses += 1
                else:
                    misses = 0
                time.sleep(1.0)
                continue
            misses = 0
            try:
                for kind, doc in _read_events(stream):
                    if kind == "hello":
                        last_id = doc.get("lastId", last_id)
                        for gpu, v in (doc.get("gpus") or {}).items():
                            if v.get("status"):
                                _show_if_changed(gpu, v["status"], shown)
                        continue
                    if "id" in doc:
                        last_id = doc["id"]
                    if kind == "progress":
                        _print_progress(doc["data"])
                    elif kind == "status":
                        _show_if_changed(str(doc["gpu"]), doc["data"], shown)
            except (OSError, ValueError, KeyError, TypeError):
                pass
            finally:
                stream.close()
            time.sleep(0.2)
    except KeyboardInterrupt:
        return EXIT_OK
    print(f"vramctl: lost the supervisor at {base}", file=sys.stderr)
    return EXIT_FAIL


def _show_if_changed(gpu: str, g: dict[str, Any], shown: dict[str, tuple[Any, ...]]) -> None:
    summary = _summary(g)
    if shown.get(gpu) != summary:
        shown[gpu] = summary
        _print_gpu(gpu, g)


def _poll_once(base: str, shown: dict[str, tuple[Any, ...]]) -> bool | None:
    try:
        _, st = _request(base + "/status")
    except (urllib.error.URLError, OSError):
        return None
    for gpu, g in st["gpus"].items():
        _show_if_changed(gpu, g, shown)
    return True


SWITCH_IN_KUBERNETES = (
    "desired state comes from ModelDeployment resources here: "
    'kubectl -n NAMESPACE patch md NAME --type merge -p \'{"spec":{"activeModel":"MODEL"}}\''
)


def _gpu_uuid_of(built: Callable[[], Any]) -> Callable[[int], str | None]:
    """The Pod runtime's NVIDIA_VISIBLE_DEVICES: the GPU's UUID as its worker's probe reports it."""

    def uuid(gpu: int) -> str | None:
        w = built().supervisor.workers.get(gpu)
        try:
            return (w.probe.info().uuid or None) if w is not None else None
        except Exception:
            return None

    return uuid


def cmd_operator(args: argparse.Namespace) -> int:
    """Act on the ModelDeployments whose spec.nodeName is this node, until SIGTERM."""
    from vramctl.app import build_operator, settle_heap
    from vramctl.spec.models import GpuProbeConfig
    from vramctl.web.guards import is_loopback
    from vramctl.web.server import FaceOptions

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # "Timer succeeded" every 10 s per object; ours say what happened
    if not args.node_name:
        print(
            "vramctl operator: the node name is required: --node-name, or NODE_NAME from the downward API (spec.nodeName)", file=sys.stderr
        )
        return EXIT_USAGE
    globbed = [n for n in args.namespace or () if any(ch in n for ch in "*?[!")]
    if globbed:
        print(f"vramctl operator: --namespace takes exact names, not patterns: {', '.join(globbed)}", file=sys.stderr)
        return EXIT_USAGE
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        from vramctl.sources.kubernetes.client import Session
        from vramctl.sources.kubernetes.controller import ModelDeployments
        from vramctl.sources.kubernetes.handlers import run as run_handlers
    except ImportError as err:
        print(f"vramctl operator needs kopf: pip install 'vramctl[kubernetes]' ({err})", file=sys.stderr)
        return EXIT_USAGE
    session = Session()
    pod_runtime = None
    if args.runtime == "kubernetes":
        from vramctl.runtimes.kubernetes import PodRuntime

        pod_runtime = PodRuntime(
            session.api,
            args.node_name,
            args.instance,
            gpu_mode=args.pod_gpu,
            runtime_class=args.runtime_class,
            gpu_uuid=_gpu_uuid_of(lambda: built),
        )
    try:
        built = build_operator(args.instance, GpuProbeConfig(kind=args.gpu_probe), dcgm_compat=args.dcgm_compat, runtime=pod_runtime)
    except (ConfigError, ValueError) as err:
        print(err.render() if isinstance(err, ConfigError) else f"vramctl operator: {err}", file=sys.stderr)
        return EXIT_USAGE
    host, port = args.listen
    token = args.token or os.environ.get("VRAMCTL_TOKEN") or None
    options = FaceOptions(
        api=(host, port),
        gateway=args.gateway or None,
        token=token,
        switch_refusal=SWITCH_IN_KUBERNETES,
        holds_on_api=bool(token) or is_loopback(host),  # holds switch GPUs: off loopback only with the token
    )
    face = _serve(built.supervisor, options)
    if face is None:
        return EXIT_USAGE
    controller = ModelDeployments(args.node_name, built.supervisor, built.runtime, built.make_worker, session=session)
    api = face.api
    face.start()
    built.supervisor.start()
    settle_heap()
    _say_gateway(face)
    where = "all namespaces" if not args.namespace else "namespace(s) " + ", ".join(args.namespace)
    print(
        f"vramctl operator: node {args.node_name}, instance {args.instance}, {where}; "
        f"listening on http://{api.host}:{api.port} (/metrics, /healthz, /status)",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_handlers(controller, clusterwide=not args.namespace, namespaces=args.namespace or (), timer_interval=args.timer_seconds)
    finally:
        print("vramctl operator: shutting down (models keep running)", file=sys.stderr, flush=True)
        controller.close()
        face.stop()
        built.supervisor.stop()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vramctl", description="Keep exactly one heavy model server on each GPU.")
    p.add_argument("--version", action="version", version=f"vramctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the supervisor in the foreground")
    up.add_argument("--config", help="config file (default: the embedded demo stack)")
    up.add_argument("--state", help="state file (default: $XDG_STATE_HOME/vramctl/state.json)")
    up.add_argument("--listen", type=_parse_listen, default=_parse_listen(DEFAULT_LISTEN), help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    up.add_argument("--token", help="bearer token for POST /switch (required off loopback; or VRAMCTL_TOKEN)")
    up.add_argument("--instance", default="default", help="label value separating several vramctl instances on one engine")
    up.add_argument(
        "--allow-host",
        action="append",
        help="another Host header POST requests may carry (repeatable), e.g. a name this machine is reached by; default: the bound address",
    )
    up.add_argument(
        "--gateway",
        type=_parse_listen,
        help="HOST:PORT for the OpenAI-style gateway and /holds (off unless given; off loopback it needs the token)",
    )
    up.add_argument("--once", action="store_true", help="converge once, then exit")
    up.add_argument(
        "--keep-models",
        action="store_true",
        help="process runtime: leave the models running at a graceful stop, for the next up to adopt (default: stop them)",
    )
    up.add_argument("-v", "--verbose", action="store_true")
    up.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", help="stop everything this instance runs (vramctl up first), sleepers too; remove its containers")
    dn.add_argument("--config", help="config file (default: the embedded demo stack)")
    dn.add_argument("--state", help="state file (default: $XDG_STATE_HOME/vramctl/state.json)")
    dn.add_argument("--instance", default="default", help="the instance to take down (as given to vramctl up)")
    dn.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a running vramctl up to stop (default 120)")
    dn.set_defaults(func=cmd_down)

    hd = sub.add_parser(
        "hold",
        help="hold MODEL on its GPU for a command's life: vramctl hold sdxl [--ttl S] [--url URL] -- COMMAND...",
        add_help=False,
    )
    hd.add_argument("hold_args", nargs=argparse.REMAINDER)

    sw = sub.add_parser("switch", help="make MODEL hold the GPU ('' frees it)")
    sw.add_argument("model")
    sw.add_argument("--companions", help="comma-separated light models to run beside it (default: keep the configured ones)")
    sw.add_argument("--gpu", type=int)
    sw.add_argument("--wait", action="store_true", help="follow the switch until it ends")
    sw.add_argument("--timeout", type=float, default=600.0)
    sw.add_argument("--url", help=f"supervisor URL (default http://{DEFAULT_LISTEN} or VRAMCTL_URL)")
    sw.add_argument("--token")
    sw.add_argument("--force", action="store_true", help="switch now even while holds are live on the running model (they are revoked)")
    sw.set_defaults(func=cmd_switch)

    st = sub.add_parser("status", help="show what holds each GPU")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="then follow it: each step, and a GPU again when it changes (Ctrl-C ends)")
    st.add_argument("--url")
    st.add_argument("--state", help="read this state file when no supervisor answers")
    st.set_defaults(func=cmd_status)

    va = sub.add_parser("validate", help="check a config file")
    va.add_argument("file")
    va.set_defaults(func=cmd_validate)

    dr = sub.add_parser("doctor", help="check this machine for the config: NVML, GPUs, WSL2, Docker, config pitfalls")
    dr.add_argument("--config", help="config file (default: the embedded demo stack)")
    dr.add_argument("--json", action="store_true", help="print the checks as JSON")
    dr.add_argument(
        "--kubernetes",
        action="store_true",
        help="check this node for the Pod runtime instead: API reachable, RuntimeClass, device plugin, NVML in this Pod",
    )
    dr.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="with --kubernetes: this node (default: $NODE_NAME)")
    dr.add_argument("--runtime-class", default="nvidia", help="with --kubernetes: the model Pods' RuntimeClass (default nvidia)")
    dr.add_argument("--pod-gpu", choices=("runtimeClass", "resource", "none"), default="runtimeClass", help="with --kubernetes: as the operator's")
    dr.add_argument("--kubeconfig", help="with --kubernetes: kubeconfig file (default: the pod's service account, or $KUBECONFIG)")
    dr.set_defaults(func=cmd_doctor)

    op = sub.add_parser("operator", help="run as the Kubernetes operator of this node (ModelDeployment resources)")
    op.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        help="act on the ModelDeployments whose spec.nodeName is this (default: $NODE_NAME)",
    )
    op.add_argument("-n", "--namespace", action="append", help="watch this namespace, an exact name (repeatable; default: all namespaces)")
    op.add_argument(
        "--listen",
        type=_parse_listen,
        default=_parse_listen(DEFAULT_LISTEN),
        help=f"HOST:PORT of /metrics and /healthz (default {DEFAULT_LISTEN})",
    )
    op.add_argument("--token", help="bearer token for the HTTP API (or VRAMCTL_TOKEN); POST /switch is refused in this mode")
    op.add_argument(
        "--gateway",
        type=_parse_listen,
        help="HOST:PORT for the OpenAI-style gateway and /holds (off unless given; ModelDeployments with switching.mode onDemand)",
    )
    op.add_argument("--instance", default="k8s", help="label value marking this operator's containers or Pods (default k8s)")
    op.add_argument(
        "--runtime",
        choices=("docker", "kubernetes"),
        default=os.environ.get("VRAMCTL_RUNTIME") or "docker",
        help="kubernetes: models run as Pods bound to this node (no Docker socket); docker: as containers through the node's socket (default docker, or $VRAMCTL_RUNTIME)",
    )
    op.add_argument(
        "--pod-gpu",
        choices=("runtimeClass", "resource", "none"),
        default="runtimeClass",
        help="how a model Pod gets the GPU: runtimeClass (NVIDIA_VISIBLE_DEVICES=<uuid>, shared by companions), resource (nvidia.com/gpu: 1, heavy only), none",
    )
    op.add_argument("--runtime-class", default="nvidia", help="the RuntimeClass of model Pods with --pod-gpu runtimeClass (default nvidia)")
    op.add_argument("--gpu-probe", choices=("auto", "nvml", "simulated"), default="auto", help="GPU memory source (default auto)")
    op.add_argument(
        "--dcgm-compat",
        action="store_true",
        help="also export DCGM_FI_DEV_* series (as `metrics: {dcgmCompat: true}` does in compose mode)",
    )
    op.add_argument(
        "--timer-seconds", type=float, default=10.0, help="re-hand each ModelDeployment's spec to its worker this often (default 10)"
    )
    op.add_argument("--kubeconfig", help="kubeconfig file (default: the pod's service account, or $KUBECONFIG, or ~/.kube/config)")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hold"]:  # its own options and a command after `--`: the client parses them
        from vramctl import client

        return client.main(argv[1:])
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())

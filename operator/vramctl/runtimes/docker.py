"""The docker runtime: one container per model, found and owned by labels.

Ownership is the first rule here. A container is vramctl's only when it
carries ``app.kubernetes.io/managed-by=vramctl`` and either this instance's
``vramctl.io/instance`` label or this runtime's compose project label. Every
lookup filters on those labels, and every mutating call checks them again
(``_require_owned``) before it acts.

Two kinds of containers:

- image models (``image:``): vramctl creates ``vramctl-{instance}-gpu{gpu}-{model}``
  with its labels and a spec-hash label; a different hash means the spec
  changed and the container is recreated on the next start.
- compose models (``composeService:``): the compose project creates the
  container (``docker compose up --no-start``) and its compose file sets
  vramctl's labels; vramctl only starts, pauses and stops it. Never drifted.

Stopping sends the model's stop signal itself, waits exactly the (possibly
fractional) grace period, then sends SIGKILL: docker's own stop API only
takes whole seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# `import docker.errors` also binds `docker`. A bare `import docker` would be
# sorted as first-party by ruff (pyproject's src includes tests/, which has a
# tests/docker package).
import docker.errors
import docker.types
import requests.exceptions
from docker.models.containers import Container

from vramctl.observed import Workload, WorkloadState
from vramctl.runtimes.base import (
    LABEL_CLASS,
    LABEL_DEPLOYMENT,
    LABEL_GPU,
    LABEL_INSTANCE,
    LABEL_MODEL,
    LABEL_SPEC_HASH,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PermanentError,
    RuntimeFailure,
    StartError,
    StartEvent,
    StopOutcome,
    TransientError,
    check_instance,
)
from vramctl.runtimes.health import http_ready
from vramctl.spec.models import ComposeConfig, DeploymentSpec, ModelSpec, StopSpec, image_reference_problem

log = logging.getLogger(__name__)

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_ONEOFF = "com.docker.compose.oneoff"


_STATES: dict[str, WorkloadState] = {
    "created": WorkloadState.CREATED,
    "running": WorkloadState.RUNNING,
    "paused": WorkloadState.PAUSED,
    "restarting": WorkloadState.RESTARTING,
    "exited": WorkloadState.EXITED,
    "dead": WorkloadState.EXITED,
    "removing": WorkloadState.EXITED,
}
# Which container represents a model when several carry its labels.
_RANK: dict[WorkloadState, int] = {
    WorkloadState.RUNNING: 0,
    WorkloadState.RESTARTING: 1,
    WorkloadState.PAUSED: 2,
    WorkloadState.CREATED: 3,
    WorkloadState.EXITED: 4,
    WorkloadState.ABSENT: 5,
}
_RUNNING_STATES = ("running", "paused", "restarting")

# After SIGKILL a container normally exits within milliseconds; past this,
# something is badly wrong (a process stuck in the kernel).
_KILL_WAIT_SECONDS = 30.0
# How often a SIGKILLed container not gone yet is checked for a pause that froze the signal.
_FROZEN_CHECK_SECONDS = 0.5
_COMPOSE_TIMEOUT_SECONDS = 120.0
_EVENT_WINDOW_SECONDS = 0.5


# Containers come in two shapes: from a listing (``sparse``: the list API's
# fields, "State" a string, "Labels", "Names") and inspected (``reload()``:
# "State" an object, "Config.Labels", "Name"). Listings stay sparse because
# inspecting every container of every listing cost one API call each (about
# 2 ms) on every observation and health check; what needs the inspected
# fields (exit code, health status, stop signal) reloads that one container.


def _inspected(c: Container) -> bool:
    return isinstance(c.attrs.get("State"), dict)


def container_state(c: Container) -> WorkloadState:
    state = c.attrs.get("State")
    status = str((state.get("Status") if isinstance(state, dict) else state) or c.status or "")
    return _STATES.get(status, WorkloadState.EXITED)


def _labels(c: Container) -> dict[str, str]:
    return dict((c.attrs.get("Config") or {}).get("Labels") or c.attrs.get("Labels") or {})


def _name(c: Container) -> str:
    names = c.attrs.get("Names") or [None]
    return str(c.attrs.get("Name") or names[0] or c.id).lstrip("/")


def _explain(err: docker.errors.APIError) -> str:
    return str(err.explanation or err)


def docker_problem(images: Iterable[str] = (), timeout: float = 3.0) -> str | None:
    """Why the docker runtime cannot be used here, or None when it can.

    The engine must answer a ping; each of ``images`` must be present locally
    (vramctl never pulls).
    """
    try:
        client = docker.from_env(timeout=max(1, math.ceil(timeout)))
    except docker.errors.DockerException as err:
        return f"no Docker engine answers ({err})"
    try:
        try:
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            return f"the Docker engine does not answer ({err})"
        missing = []
        for image in images:
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
                return f"the Docker engine failed to list images ({err})"
        if missing:
            return f"image(s) {', '.join(missing)} not present locally (vramctl never pulls; build or pull them)"
        return None
    finally:
        client.close()


@dataclass(frozen=True)
class EngineFacts:
    """What ``vramctl doctor`` reports about the Docker engine."""

    version: str
    api_version: str
    runtimes: tuple[str, ...]  # e.g. ("io.containerd.runc.v2", "nvidia", "runc")
    default_runtime: str

    @property
    def nvidia(self) -> bool:
        return "nvidia" in self.runtimes


def engine_facts(timeout: float = 3.0) -> EngineFacts | str:
    """The engine's version and runtimes, or why it cannot be asked."""
    try:
        client = docker.from_env(timeout=max(1, math.ceil(timeout)))
    except docker.errors.DockerException as err:
        return f"no Docker engine answers ({err})"
    try:
        version = client.version()
        info = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        return f"the Docker engine does not answer ({err})"
    finally:
        client.close()
    return EngineFacts(
        version=str(version.get("Version", "?")),
        api_version=str(version.get("ApiVersion", "?")),
        runtimes=tuple(sorted(info.get("Runtimes") or {})),
        default_runtime=str(info.get("DefaultRuntime", "?")),
    )


def _engine_unreachable(err: BaseException) -> bool:
    """The engine could not be asked (socket gone, timeout, 5xx): a transient error."""
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(err, docker.errors.APIError):
        return err.status_code is not None and err.status_code >= 500 and "No such image" not in str(err)
    return isinstance(err, docker.errors.DockerException) and "Error while fetching server API version" in str(err)


def _classified(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Engine errors raised by ``fn`` as TransientError (the worker retries
    with back-off and says the engine is unreachable) instead of docker's own."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            if _engine_unreachable(err):
                raise TransientError(f"the Docker engine is unreachable: {err}") from err
            raise

    return call


# 'start' is gated; 'kill', 'die' and 'restart' tell a stop or restart by
# hand (`docker compose restart`) from a crash; the others only make the
# worker look again at once (a container removed or paused by hand shows in
# the status immediately).
_WATCHED_EVENTS = ("start", "kill", "die", "restart", "destroy", "pause", "unpause")


@dataclass(frozen=True)
class _Found:
    model: str
    container: Container
    compose: bool  # created by the compose project, not by vramctl


class DockerRuntime:
    """Runs each model as a docker container on this machine's engine."""

    kind = "docker"

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        instance: str = "default",
        compose: ComposeConfig | None = None,
    ) -> None:
        check_instance(instance)
        self._owns_client = client is None
        self.client: docker.DockerClient = client if client is not None else docker.from_env()
        self.instance = instance
        self.compose = compose
        self._nvidia: bool | None = None
        self._profiles: dict[str, tuple[str, ...]] | None = None

    # ------------------------------------------------------------ naming

    def container_name(self, gpu: int, model: str) -> str:
        return f"vramctl-{self.instance}-gpu{gpu}-{model}"

    def labels_for(self, deployment: DeploymentSpec, model: str) -> dict[str, str]:
        m = deployment.models[model]
        return {
            MANAGED_BY: MANAGED_BY_VALUE,
            LABEL_INSTANCE: self.instance,
            LABEL_MODEL: model,
            LABEL_GPU: str(deployment.gpu),
            LABEL_CLASS: m.model_class,
            LABEL_SPEC_HASH: deployment.spec_hash(model),
            LABEL_DEPLOYMENT: deployment.display_name,
        }

    # --------------------------------------------------------- ownership

    def owns_labels(self, labels: dict[str, str]) -> bool:
        """vramctl's mark plus this instance, or plus this compose project."""
        if labels.get(MANAGED_BY) != MANAGED_BY_VALUE:
            return False
        if labels.get(COMPOSE_PROJECT) is not None:
            # A compose container belongs to the runtime adopting its project.
            return self.compose is not None and labels.get(COMPOSE_PROJECT) == self.compose.project
        return labels.get(LABEL_INSTANCE) == self.instance

    def _require_owned(self, c: Container, action: str) -> None:
        """Defence in depth: refuse to act on anything that is not ours."""
        if not self.owns_labels(_labels(c)):
            raise PermanentError(
                f"refusing to {action} container {_name(c)}: it does not carry {MANAGED_BY}={MANAGED_BY_VALUE} "
                f"with {LABEL_INSTANCE}={self.instance}" + (f" or {COMPOSE_PROJECT}={self.compose.project}" if self.compose else "")
            )

    # ------------------------------------------------------------ lookup

    def _list(self, labels: Iterable[str]) -> list[Container]:
        result: list[Container] = self.client.containers.list(all=True, filters={"label": list(labels)}, ignore_removed=True, sparse=True)
        return result

    def _model_of(self, deployment: DeploymentSpec, labels: dict[str, str]) -> str | None:
        model = labels.get(LABEL_MODEL)
        if model:
            return model
        service = labels.get(COMPOSE_SERVICE)
        if service and labels.get(COMPOSE_PROJECT) is not None:
            for name, m in deployment.models.items():
                if m.compose_service == service:
                    return name
        return None

    def _found(self, deployment: DeploymentSpec) -> list[_Found]:
        """Every container of ours on this deployment's GPU, live ones first."""
        gpu = f"{LABEL_GPU}={deployment.gpu}"
        managed = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
        seen: dict[str, Container] = {}
        for c in self._list([managed, f"{LABEL_INSTANCE}={self.instance}", gpu]):
            seen[c.id] = c
        if self.compose is not None:
            for c in self._list([managed, f"{COMPOSE_PROJECT}={self.compose.project}", gpu]):
                seen[c.id] = c
        out: list[_Found] = []
        for c in seen.values():
            labels = _labels(c)
            if not self.owns_labels(labels) or labels.get(COMPOSE_ONEOFF) == "True":
                continue
            model = self._model_of(deployment, labels)
            if model is None:
                log.warning("container %s has vramctl's labels but no %s label: ignored", _name(c), LABEL_MODEL)
                continue
            out.append(_Found(model, c, compose=labels.get(COMPOSE_PROJECT) is not None))
        canonical = {self.container_name(deployment.gpu, f.model) for f in out}
        out.sort(key=lambda f: (_RANK[container_state(f.container)], _name(f.container) not in canonical, _name(f.container)))
        return out

    def _of_model(self, deployment: DeploymentSpec, model: str) -> list[Container]:
        return [f.container for f in self._found(deployment) if f.model == model]

    def _drifted(self, deployment: DeploymentSpec, f: _Found) -> bool:
        m = deployment.models.get(f.model)
        if m is None:
            return False  # not in the spec any more: the planner stops it anyway
        if f.compose:
            # Never drifted while the spec still names this container's
            # service: compose owns its configuration, not vramctl.
            return m.compose_service != _labels(f.container).get(COMPOSE_SERVICE)
        if m.image is None:
            return True  # the spec moved from an image to compose (or to a command)
        return _labels(f.container).get(LABEL_SPEC_HASH) != deployment.spec_hash(f.model)

    # ------------------------------------------------------------ observe

    @_classified
    def observe(self, deployment: DeploymentSpec) -> dict[str, Workload]:
        out: dict[str, Workload] = {}
        for f in self._found(deployment):
            if f.model in out:
                continue  # _found is sorted: the first one is the most alive
            c = f.container
            state = container_state(c)
            labels = _labels(c)
            exit_code: int | None = None
            if state is WorkloadState.EXITED and (_inspected(c) or self._reload(c)):
                raw = (c.attrs.get("State") or {}).get("ExitCode")
                exit_code = int(raw) if raw is not None else None
            spec_model = deployment.models.get(f.model)
            heavy_label = labels.get(LABEL_CLASS)
            heavy = heavy_label != "light" if heavy_label else (spec_model.heavy if spec_model else True)
            out[f.model] = Workload(
                model=f.model,
                state=state,
                ref=c.id,
                drifted=self._drifted(deployment, f),
                exit_code=exit_code,
                heavy=heavy,
            )
        return out

    # -------------------------------------------------------------- start

    @_classified
    def start(self, deployment: DeploymentSpec, model: str) -> str:
        m = deployment.models.get(model)
        if m is None:
            raise StartError(f"model {model!r} is not in the spec of {deployment.display_name}")
        if m.compose_service is not None:
            return self._start_compose(deployment, model, m, m.compose_service)
        if m.image is None:
            raise StartError(f"model {model!r} has no image: the docker runtime needs image or composeService")

        name = self.container_name(deployment.gpu, model)
        current = [f for f in self._found(deployment) if f.model == model and not f.compose]
        c: Container | None = None
        if current:
            f = next((x for x in current if _name(x.container) == name), current[0])
            c = f.container
            if self._drifted(deployment, f):
                log.info("%s: spec changed, recreating %s", model, _name(c))
                self._stop_container(c, m.stop)
                self._remove_container(c)
                c = None
            else:
                live = self._resume(c)
                if live is not None:
                    return live
        if c is None:
            c = self._create(deployment, model, m, m.image, name)
        self._start_container(c)
        return str(c.id)

    def _has_nvidia(self) -> bool:
        if self._nvidia is None:
            try:
                runtimes = self.client.info().get("Runtimes") or {}
            except docker.errors.DockerException:
                return False  # do not cache a failed look
            self._nvidia = "nvidia" in runtimes
        return self._nvidia

    def create_kwargs(self, deployment: DeploymentSpec, model: str) -> dict[str, Any]:
        """Arguments of the low-level create_container call (tests read them)."""
        m = deployment.models[model]
        network_mode = m.network_mode or "host"
        publish = network_mode not in ("host", "none") and not network_mode.startswith("container:")
        port_bindings: dict[int, int] = {}
        if publish:
            for p in m.ports:
                host, cont = p.split(":")
                port_bindings[int(cont)] = int(host)
        device_requests = None
        want = {"runtimeClass": "auto", "resource": "auto", "none": "never"}.get(m.gpu_request, m.gpu_request)
        if want == "always" or (want == "auto" and self._has_nvidia()):
            device_requests = [
                docker.types.DeviceRequest(driver="nvidia", device_ids=[str(g) for g in deployment.gpus_of(model)], capabilities=[["gpu"]])
            ]
        host_config = self.client.api.create_host_config(
            network_mode=network_mode,
            port_bindings=port_bindings or None,
            binds=list(m.volumes) or None,
            device_requests=device_requests,
            ipc_mode=m.ipc_mode,
        )
        return {
            "image": m.image,
            # The engine's rendered arguments (vLLM flags, api_v2.py ...), then the model's args.
            "command": deployment.container_command(model),
            "name": self.container_name(deployment.gpu, model),
            "environment": deployment.merged_env(model),
            "labels": self.labels_for(deployment, model),
            "ports": list(port_bindings) or None,
            "stop_signal": m.stop.signal,
            # For a plain `docker stop` by a person: docker takes whole seconds.
            "stop_timeout": math.ceil(m.stop.grace_period_seconds),
            "host_config": host_config,
        }

    def _create(self, deployment: DeploymentSpec, model: str, m: ModelSpec, image: str, name: str) -> Container:
        kwargs = self.create_kwargs(deployment, model)
        try:
            created = self.client.api.create_container(**kwargs)
        except docker.errors.ImageNotFound:
            raise StartError(f"image {image} not found locally; build or pull it (vramctl never pulls images)") from None
        except docker.errors.APIError as err:
            if err.status_code == 409:
                raise StartError(self._name_conflict(name, err)) from None
            raise RuntimeFailure(f"docker could not create {name}: {_explain(err)}") from None
        try:
            c: Container = self.client.containers.get(created["Id"])
        except docker.errors.NotFound:
            raise RuntimeFailure(f"container {name} vanished right after it was created") from None
        self._require_owned(c, "start")
        return c

    def _name_conflict(self, name: str, err: docker.errors.APIError) -> str:
        try:
            other = self.client.containers.get(name)
        except docker.errors.DockerException:
            return f"docker could not create {name}: {_explain(err)}"
        if not self.owns_labels(_labels(other)):
            return (
                f"a container named {name} already exists and is not managed by this vramctl instance "
                f"(it lacks {MANAGED_BY}={MANAGED_BY_VALUE} + {LABEL_INSTANCE}={self.instance}); "
                "vramctl leaves it alone: rename or remove it, or run vramctl with another instance name"
            )
        return f"container {name} already exists with other labels (another GPU or a stale copy): remove it; docker said: {_explain(err)}"

    def _resume(self, c: Container) -> str | None:
        """Unpause a paused container; the id of one that is already live
        (running, restarting, or just unpaused), None for one to be started."""
        state = container_state(c)
        if state is WorkloadState.PAUSED:
            self._require_owned(c, "unpause")
            try:
                c.unpause()
            except docker.errors.APIError as err:
                raise RuntimeFailure(f"docker could not unpause {_name(c)}: {_explain(err)}") from None
            return str(c.id)
        if state in (WorkloadState.RUNNING, WorkloadState.RESTARTING):
            return str(c.id)
        return None

    def _start_container(self, c: Container) -> None:
        self._require_owned(c, "start")
        try:
            c.start()
        except docker.errors.APIError as err:
            raise RuntimeFailure(f"docker could not start {_name(c)}: {_explain(err)}") from None

    # ------------------------------------------------------------ compose

    def _compose_containers(self, service: str) -> list[Container]:
        assert self.compose is not None
        cs = [
            c
            for c in self._list([f"{COMPOSE_PROJECT}={self.compose.project}", f"{COMPOSE_SERVICE}={service}"])
            if _labels(c).get(COMPOSE_ONEOFF) != "True"
        ]
        cs.sort(key=lambda c: (_RANK[container_state(c)], _name(c)))
        return cs

    def _compose_cmd(self, *args: str) -> list[str]:
        assert self.compose is not None
        cmd = ["docker", "compose", "-p", self.compose.project]
        for f in self.compose.files:
            cmd += ["-f", f]
        if self.compose.project_directory:
            cmd += ["--project-directory", self.compose.project_directory]
        return cmd + list(args)

    def _compose_run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPOSE_TIMEOUT_SECONDS, check=False)
        except FileNotFoundError:
            raise StartError("the docker CLI (with compose v2) is needed to create a composeService's container: install it") from None
        except subprocess.TimeoutExpired:
            raise TransientError(f"`{' '.join(cmd)}` took more than {_COMPOSE_TIMEOUT_SECONDS:.0f} s") from None

    def _compose_create(self, service: str) -> None:
        """Let compose create (not start) the service's container."""
        cmd = self._compose_cmd("up", "--no-start", "--no-deps", service)
        res = self._compose_run(cmd)
        if res.returncode != 0 and "no such service" in (res.stderr + res.stdout).lower():
            # Old compose versions do not activate a named service's profile.
            res = self._compose_run([*cmd[:-4], "--profile", "*", *cmd[-4:]])
        if res.returncode != 0:
            out = (res.stderr or res.stdout).strip()
            tail = "\n".join(out.splitlines()[-5:])
            # No such service: the spec names what the project lacks. Anything else may pass (an engine restarting).
            error = StartError if "no such service" in out.lower() else RuntimeFailure
            raise error(f"`{' '.join(cmd)}` failed with exit code {res.returncode}: {tail}")

    def _compose_profiles(self, refresh: bool = False) -> dict[str, tuple[str, ...]]:
        """Each service of the compose project and its profiles (cached;
        `docker compose config` takes about 0.1 s, read before any event needs it)."""
        if self.compose is None:
            return {}
        if self._profiles is None or refresh:
            profiles: dict[str, tuple[str, ...]] = {}
            try:
                res = self._compose_run(self._compose_cmd("--profile", "*", "config", "--format", "json"))
                if res.returncode == 0:
                    services = (json.loads(res.stdout) or {}).get("services") or {}
                    profiles = {str(k): tuple(v.get("profiles") or ()) for k, v in services.items()}
            except (StartError, ValueError, AttributeError) as err:
                log.debug("compose config: %s", err)
            self._profiles = profiles
        return self._profiles

    def _without_profile(self, attrs: dict[str, str]) -> bool:
        """A container of our compose project whose service has no profile:
        `docker compose --profile X up -d` starts it along with X."""
        service = attrs.get(COMPOSE_SERVICE)
        if self.compose is None or service is None or attrs.get(COMPOSE_PROJECT) != self.compose.project:
            return False
        profiles = self._compose_profiles()
        if service not in profiles:
            profiles = self._compose_profiles(refresh=True)
        return service in profiles and not profiles[service]

    def _compose_label_problems(self, deployment: DeploymentSpec, model: str, c: Container) -> list[str]:
        labels = _labels(c)
        problems = []
        if labels.get(MANAGED_BY) != MANAGED_BY_VALUE:
            problems.append(f"{MANAGED_BY}: {MANAGED_BY_VALUE}")
        if labels.get(LABEL_MODEL) != model:
            problems.append(f"{LABEL_MODEL}: {model}")
        if labels.get(LABEL_GPU) != str(deployment.gpu):
            problems.append(f'{LABEL_GPU}: "{deployment.gpu}"')
        return problems

    def _start_compose(self, deployment: DeploymentSpec, model: str, m: ModelSpec, service: str) -> str:
        if self.compose is None:
            raise StartError(
                f"model {model!r} uses composeService {service!r} but no compose project is configured: set compose.project in the config"
            )
        cs = self._compose_containers(service)
        if not cs:
            self._compose_create(service)
            cs = self._compose_containers(service)
            if not cs:
                raise StartError(f"`docker compose up --no-start {service}` created no container for project {self.compose.project}")
        c = cs[0]
        problems = self._compose_label_problems(deployment, model, c)
        if problems:
            raise StartError(
                f"container {_name(c)} of compose service {service!r} lacks vramctl's labels ({', '.join(problems)}); "
                f"vramctl never touches a container without {MANAGED_BY}={MANAGED_BY_VALUE}. "
                f"Fix: add under services.{service}.labels in the compose file: {'; '.join(problems)}; "
                f"{LABEL_CLASS}: {m.model_class} — then recreate it with `docker compose up --no-start {service}`"
            )
        self._require_owned(c, "start")
        live = self._resume(c)
        if live is not None:
            return live
        self._start_container(c)
        return str(c.id)

    # --------------------------------------------------------------- stop

    def _reload(self, c: Container) -> bool:
        """Refresh ``c.attrs``; False when the container is gone."""
        try:
            c.reload()
        except docker.errors.NotFound:
            return False
        return True

    def _is_running(self, c: Container) -> bool:
        return self._reload(c) and str(c.attrs["State"]["Status"]) in _RUNNING_STATES

    def _wait_exit(self, c: Container, timeout: float) -> bool:
        """Block until the container is not running, at most ``timeout`` s."""
        if timeout > 0:
            try:
                c.wait(timeout=timeout, condition="not-running")
            except docker.errors.NotFound:
                return True
            except (requests.exceptions.RequestException, docker.errors.APIError):
                pass  # read timeout: still running (checked below)
        return not self._is_running(c)

    def _wait_killed(self, c: Container) -> bool:
        """After a SIGKILL: block until the container is not running, at most
        ``_KILL_WAIT_SECONDS``. A container found paused meanwhile (the gate
        froze it as the signal went out) is sent SIGKILL again: cgroup v1's
        freezer holds a pending SIGKILL until the process is thawed, and the
        engine's kill of a paused container sees to that, so the process dies
        without running another instruction."""
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while True:
            left = deadline - time.monotonic()
            if self._wait_exit(c, min(_FROZEN_CHECK_SECONDS, left)):
                return True
            if left <= _FROZEN_CHECK_SECONDS:
                return False
            if str(c.attrs["State"]["Status"]) == "paused":  # as read by _wait_exit just now
                log.info("%s was paused before the SIGKILL took effect: killing it as frozen", _name(c))
                try:
                    c.kill(signal="SIGKILL")
                except docker.errors.NotFound:
                    return True
                except docker.errors.APIError as err:
                    log.debug("SIGKILL to paused %s: %s", _name(c), _explain(err))

    def _stop_container(self, c: Container, stop: StopSpec | None) -> StopOutcome:
        """Signal, wait the grace period (fractions honoured), SIGKILL, wait."""
        t0 = time.monotonic()
        model = _labels(c).get(LABEL_MODEL, _name(c))
        if not self._reload(c):
            return StopOutcome(model, was_running=False, killed=False, seconds=0.0)
        status = str(c.attrs["State"]["Status"])
        if status not in _RUNNING_STATES:
            code = c.attrs["State"].get("ExitCode")
            return StopOutcome(model, False, False, time.monotonic() - t0, int(code) if code is not None else None)
        self._require_owned(c, "stop")
        self._keep_stopped(c)
        config = c.attrs.get("Config") or {}
        if stop is not None:
            sig, grace = stop.signal, stop.grace_period_seconds
        else:  # not in the spec any more: what the container was created with
            sig = str(config.get("StopSignal") or "SIGTERM")
            grace = float(config.get("StopTimeout") or 10)

        killed = False
        if status == "restarting":
            # Between restarts there is no process to signal; docker's stop
            # cancels the restart loop.
            try:
                c.stop(timeout=math.ceil(grace))
            except docker.errors.APIError as err:
                log.debug("stop of restarting %s: %s", _name(c), _explain(err))
        elif status == "paused":
            # Frozen (gated before it could allocate, or paused by hand): thawing
            # it for a graceful stop would let it run beside the GPU's holder
            # for its whole grace period. SIGKILL works on a frozen container.
            try:
                c.kill(signal="SIGKILL")
                killed = True
            except docker.errors.NotFound:
                return StopOutcome(model, True, False, time.monotonic() - t0)
            except docker.errors.APIError as err:
                log.debug("SIGKILL to paused %s: %s", _name(c), _explain(err))
        else:
            deadline = time.monotonic() + grace  # the grace period counts from the signal
            try:
                c.kill(signal=sig)
            except docker.errors.NotFound:
                return StopOutcome(model, True, False, time.monotonic() - t0)
            except docker.errors.APIError as err:
                log.debug("%s to %s: %s", sig, _name(c), _explain(err))  # already exited
            if not self._wait_exit(c, deadline - time.monotonic()):
                try:
                    c.kill(signal="SIGKILL")
                    killed = True
                except docker.errors.NotFound:
                    return StopOutcome(model, True, False, time.monotonic() - t0)
                except docker.errors.APIError as err:
                    log.debug("SIGKILL to %s: %s", _name(c), _explain(err))  # exited meanwhile
        if not self._wait_killed(c):
            raise TransientError(f"container {_name(c)} is still running {_KILL_WAIT_SECONDS:.0f} s after SIGKILL")
        state = c.attrs.get("State") or {}
        code = state.get("ExitCode")
        exit_code = int(code) if code is not None else None
        if not killed and exit_code == 137 and not state.get("OOMKilled"):
            killed = True  # killed by someone else's SIGKILL (e.g. docker's own stop timeout)
        return StopOutcome(model, True, killed, time.monotonic() - t0, exit_code)

    def _keep_stopped(self, c: Container) -> None:
        """``restart: always`` brings back, at the next daemon restart, a
        container that vramctl stopped: beside the model that holds the GPU.
        ``unless-stopped`` still restarts it after a crash, but leaves it
        stopped when it was stopped on purpose."""
        policy = ((c.attrs.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")
        if policy != "always":
            return
        try:
            c.update(restart_policy={"Name": "unless-stopped", "MaximumRetryCount": 0})
            log.info("%s: restart policy always -> unless-stopped, so a daemon restart leaves it stopped", _name(c))
        except docker.errors.APIError as err:
            log.warning("%s: could not change its restart policy (%s): a daemon restart may start it again", _name(c), _explain(err))

    @_classified
    def stop(self, deployment: DeploymentSpec, model: str) -> StopOutcome:
        t0 = time.monotonic()
        m = deployment.models.get(model)
        outcomes = []
        for c in self._of_model(deployment, model):
            stop = m.stop if m is not None else None
            if m is not None and m.compose_service is not None and "signal" not in m.stop.model_fields_set:
                # The spec left the signal at its default: keep the compose
                # file's stop_signal (docker cancels restart policies only for
                # the container's own stop signal).
                own = (c.attrs.get("Config") or {}).get("StopSignal") if _inspected(c) or self._reload(c) else None
                if own:
                    with contextlib.suppress(ValueError):  # e.g. a numeric signal: use the spec's
                        stop = StopSpec(signal=str(own), grace_period_seconds=m.stop.grace_period_seconds)
            outcomes.append(self._stop_container(c, stop))
        if not outcomes:
            return StopOutcome(model, was_running=False, killed=False, seconds=time.monotonic() - t0)
        first = outcomes[0]
        return StopOutcome(
            model=model,
            was_running=any(o.was_running for o in outcomes),
            killed=any(o.killed for o in outcomes),
            seconds=time.monotonic() - t0,
            exit_code=first.exit_code,
        )

    # ------------------------------------------------------- pause, logs

    @_classified
    def preflight(self, deployment: DeploymentSpec, model: str) -> str | None:
        """The image is present locally (vramctl never pulls), or the compose
        service's container exists or its project can create it."""
        m = deployment.models.get(model)
        if m is None:
            return f"{model!r} is not in the spec"
        if m.compose_service is not None:
            if self.compose is None:
                return f"{model!r} names composeService {m.compose_service!r} but no compose project is configured"
            return None  # compose creates it on start; a missing service is a start error naming it
        if m.image is None:
            return f"{model!r} has no image"
        bad = image_reference_problem(m.image)
        if bad is not None:  # the engine would refuse it only at the start, after the running model was stopped
            return bad
        try:
            self.client.images.get(m.image)
        except docker.errors.ImageNotFound:
            return f"image {m.image} not found locally; build or pull it (vramctl never pulls images)"
        except docker.errors.APIError as err:
            if err.status_code in (400, 404) and not _engine_unreachable(err):
                return f"the Docker engine refuses image {m.image!r}: {_explain(err)}"
            raise
        return None

    def cleanup(self, deployment: DeploymentSpec, model: str) -> None:
        """Nothing to do: an exited container leaves no processes behind."""

    @_classified
    def pause(self, deployment: DeploymentSpec, model: str) -> None:
        for c in self._of_model(deployment, model):
            if container_state(c) is not WorkloadState.RUNNING:
                continue
            self._require_owned(c, "pause")
            try:
                c.pause()
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError as err:
                if self._reload(c) and container_state(c) is WorkloadState.RUNNING:
                    raise TransientError(f"docker could not pause {_name(c)}: {_explain(err)}") from None

    def logs_tail(self, deployment: DeploymentSpec, model: str, lines: int = 20) -> list[str]:
        cs = self._of_model(deployment, model)
        if not cs or lines <= 0:
            return []
        try:
            raw = cs[0].logs(stdout=True, stderr=True, tail=lines)
        except docker.errors.DockerException:
            return []
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return text.splitlines()[-lines:]

    @_classified
    def remove(self, deployment: DeploymentSpec, model: str) -> None:
        m = deployment.models.get(model)
        for c in self._of_model(deployment, model):
            self._stop_container(c, m.stop if m is not None else None)
            self._remove_container(c)

    def _remove_container(self, c: Container) -> None:
        self._require_owned(c, "remove")
        try:
            c.remove(force=True, v=False)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            if err.status_code != 409:  # 409: removal already in progress
                raise TransientError(f"docker could not remove {_name(c)}: {_explain(err)}") from None

    # ------------------------------------------------------------- health

    @_classified
    def check_health(self, deployment: DeploymentSpec, model: str) -> bool:
        cs = self._of_model(deployment, model)
        if not cs or container_state(cs[0]) is not WorkloadState.RUNNING:
            return False
        health = deployment.health_of(model) if model in deployment.models else None
        if health is None:
            return True
        if health.path is not None and health.port is not None:
            return http_ready(health.host, health.port, health.path, timeout=1.0)
        if health.docker_healthcheck:
            if not (_inspected(cs[0]) or self._reload(cs[0])):
                return False
            status = ((cs[0].attrs.get("State") or {}).get("Health") or {}).get("Status")
            return status == "healthy"
        return True

    # ----------------------------------------------------------- validate

    def validate(self, deployment: DeploymentSpec) -> list[tuple[str, str]]:
        """Problems as (path relative to the deployment, message)."""
        problems: list[tuple[str, str]] = []
        for name, m in deployment.models.items():
            if m.image is None and m.compose_service is None:
                problems.append(
                    (f"models.{name}.image", "the docker runtime needs image or composeService (command is for the process runtime)")
                )
            if m.compose_service is not None and self.compose is None:
                problems.append(
                    (f"models.{name}.composeService", "composeService needs a compose project: set compose.project (and compose.files)")
                )
        return problems

    # -------------------------------------------------------------- watch

    def _event_owned(self, attrs: dict[str, str]) -> bool:
        return self.owns_labels(attrs) and attrs.get(COMPOSE_ONEOFF) != "True"

    @_classified
    def owners(self, deployment: DeploymentSpec) -> dict[str, str]:
        """``{full container id: model}`` of this GPU's containers that are
        running, paused or restarting: a GPU process is ours when its cgroup
        names one of them (``gpu.cgroups``). One container listing."""
        return {str(f.container.id): f.model for f in self._found(deployment) if container_state(f.container).live}

    def watch_starts(self, on_start: Callable[[StartEvent], None], stop: Callable[[], bool]) -> None:
        """Follow docker 'start' events of our containers until ``stop()``.

        Events are read in back-to-back windows of about half a second
        (``since``/``until``), so ``stop()`` is noticed within one window and
        no event falls between two windows.
        """
        self._compose_profiles()  # before the first start event needs it
        since = time.time()
        seen: dict[tuple[str, int], float] = {}
        filters = {"type": "container", "event": list(_WATCHED_EVENTS), "label": [f"{MANAGED_BY}={MANAGED_BY_VALUE}"]}
        while not stop():
            until = time.time() + _EVENT_WINDOW_SECONDS
            try:
                for ev in self.client.events(since=f"{since:.9f}", until=f"{until:.9f}", filters=filters, decode=True):
                    self._handle_start_event(ev, seen, on_start)
                    if stop():
                        return
            except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
                # The engine went away (a daemon restart): the caller reconnects with back-off.
                raise TransientError(f"docker events: {err}") from err
            since = until
            horizon = time.time() - 10 * _EVENT_WINDOW_SECONDS
            for k in [k for k, t in seen.items() if t < horizon]:
                del seen[k]

    def _handle_start_event(self, ev: dict[str, Any], seen: dict[tuple[str, int], float], on_start: Callable[[StartEvent], None]) -> None:
        action = str(ev.get("Action") or ev.get("status") or "")
        if ev.get("Type") != "container" or action not in _WATCHED_EVENTS:
            return
        actor = ev.get("Actor") or {}
        cid = str(actor.get("ID") or ev.get("id") or "")
        key = (cid, int(ev.get("timeNano") or 0))
        if key in seen:
            return  # delivered by two adjacent windows
        seen[key] = time.time()
        attrs = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
        if not self._event_owned(attrs):
            return
        model = attrs.get(LABEL_MODEL)
        try:
            gpu = int(attrs.get(LABEL_GPU, ""))
        except ValueError:
            gpu = -1
        if not model or gpu < 0:
            log.warning("start of %s: vramctl labels without %s/%s; ignored", attrs.get("name", cid), LABEL_MODEL, LABEL_GPU)
            return
        event = StartEvent(
            model=model,
            gpu=gpu,
            ref=cid,
            heavy=attrs.get(LABEL_CLASS, "heavy") != "light",
            action=action,
            incidental=action == "start" and self._without_profile(attrs),
            exit_code=_int_or_none(attrs.get("exitCode")) if action == "die" else None,
        )
        try:
            on_start(event)
        except Exception:
            log.exception("on_start(%s) failed", event)

    # -------------------------------------------------------------- close

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None

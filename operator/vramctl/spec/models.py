"""Declared state: the pydantic models for a GPU's models and the config file.

The same ``DeploymentSpec`` is read from the compose-mode YAML file and from a
``ModelDeployment`` custom resource's ``.spec``; the CRD schema is generated
from it. Validation errors name the field path and say how to fix it, because
the person reading them is editing YAML, not Python.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import signal as _signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vramctl.spec import yamlfile
from vramctl.spec.engines import (
    CONTAINER,
    SLEEPING_ENGINES,
    SOVITS_OWNED_FLAGS,
    VLLM_OWNED_FLAGS,
    EngineName,
    Rendering,
    SdxlSpec,
    SleepApi,
    SovitsSpec,
    VllmSpec,
    owned_flag_problems,
    render_sdxl,
    render_sovits,
    render_vllm,
    sleep_api,
)
from vramctl.status.redact import secrets_in

MODEL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Docker's image reference grammar (github.com/distribution/reference,
# regexp.go): [host[:port]/]path[:tag][@digest]; ``image_reference_problem``.
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = _ALNUM + r"(?:(?:[._]|__|-+)" + _ALNUM + r")*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = r"(?:" + _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*|\[[a-fA-F0-9:]+\])"
_NAME = r"(?:" + _HOST + r"(?::[0-9]+)?/)?" + _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE_RE = re.compile(r"(?P<name>" + _NAME + r")(?::" + _TAG + r")?(?:@" + _DIGEST + r")?", re.ASCII)
MAX_IMAGE_NAME = 255

# Upper bounds: a GPU's memory (1 TiB, beyond any card made) and a host's
# (64 TiB). Larger numbers are typing errors that would make the budget
# arithmetic meaningless rather than configurations.
MAX_GPU_MIB = 1 << 20
MAX_HOST_MIB = 1 << 26

# Default safety margin kept free when no explicit vramBudgetMiB is given.
DEFAULT_MARGIN_MIB = 512

# Injected into every model unless envPolicy.sdpaDefaults is false; the GPU's
# env and a model's env override them. PyTorch SDPA everywhere, never
# xformers (the users' rule, seeds/000). VLLM_ATTENTION_BACKEND is not among
# them: current vLLM ignores it (``attentionBackend`` renders the flag).
SDPA_DEFAULT_ENV: Mapping[str, str] = {
    "XFORMERS_DISABLED": "1",
    "VLLM_USE_TRITON_FLASH_ATTN": "0",
    "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512",
}


def image_reference_problem(image: str) -> str | None:
    """Why ``image`` is not a Docker image reference, or None when it is one.
    Checked before anything is stopped for it: the engine would refuse it
    only at the start ("invalid reference format"), and a reference with a
    newline or a flag in it must never reach a command line."""
    m = IMAGE_REFERENCE_RE.fullmatch(image)
    if m is None:
        return (
            f"{image!r} is not a Docker image reference: [registry[:port]/]name[:tag][@digest], "
            "name in lowercase letters, digits and . _ - separators, e.g. vllm/vllm-openai:v0.11.0"
        )
    if len(m.group("name")) > MAX_IMAGE_NAME:
        return f"{image[:40]!r}... is not a Docker image reference: its name is longer than {MAX_IMAGE_NAME} characters"
    return None


def _alias(name: str) -> str:
    """camelCase, with the unit spelled as in the docs: vram_mib -> vramMiB."""
    camel = to_camel(name)
    return camel[:-3] + "MiB" if camel.endswith("Mib") else camel


class FieldProblem(ValueError):
    """A validation message about one field below the validated object.

    ``field`` (camelCase, relative to the object) is appended to the error's
    path, so the user sees e.g. ``gpus[0].activeModel`` rather than ``gpus[0]``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=_alias,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class HealthSpec(_Model):
    """How vramctl decides a started model is ready to serve.

    ``path`` + ``port``: an HTTP GET on 127.0.0.1 answering 2xx.
    ``dockerHealthcheck: true``: the image's own HEALTHCHECK reports healthy.
    """

    path: str | None = Field(default=None, description="HTTP path that answers 2xx when the model is ready, e.g. /health.")
    port: int | None = Field(default=None, ge=1, le=65535, description="Port of the health path on 127.0.0.1.")
    host: str = Field(default="127.0.0.1", description="Host of the health path.")
    docker_healthcheck: bool = Field(default=False, description="Use the container's own HEALTHCHECK status instead of HTTP.")
    interval_seconds: float = Field(default=0.1, ge=0.01, le=30, description="How often the health path is polled while starting.")

    @model_validator(mode="after")
    def _path_needs_port(self) -> HealthSpec:
        if self.path is not None and self.port is None:
            raise FieldProblem("health.path needs health.port: add `port: <number>` next to `path`", "port")
        if self.path is not None and not self.path.startswith("/"):
            raise FieldProblem(f"health.path must start with '/': write `path: /{self.path}`", "path")
        if self.docker_healthcheck and self.path is not None:
            raise FieldProblem("choose one of health.path or health.dockerHealthcheck, not both", "dockerHealthcheck")
        return self


def _env_value(v: Any) -> Any:
    """Numbers become strings, as docker compose converts them; booleans are
    refused (true, yes and on would all be "True"), the rest is pydantic's."""
    if isinstance(v, bool):
        raise ValueError(f"{str(v).lower()} is a YAML boolean: quote it, e.g. \"{'1' if v else '0'}\" or \"{str(v).lower()}\"")
    if isinstance(v, int | float):
        return str(v)
    return v


# An environment variable's value: a string, or a number written bare.
EnvValue = Annotated[str, BeforeValidator(_env_value)]


def _signal_number(name: str) -> int:
    return int(getattr(_signal, name))


class StopSpec(_Model):
    signal: str = Field(default="SIGTERM", description="Signal sent first, e.g. SIGTERM or SIGINT.")
    grace_period_seconds: float = Field(default=10.0, ge=0, le=3600, description="Seconds to wait after the signal before SIGKILL.")

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, v: str) -> str:
        name = v.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if not hasattr(_signal, name) or name in {"SIGKILL", "SIGSTOP"}:
            raise ValueError(f"unknown or uncatchable signal {v!r}: use SIGTERM, SIGINT, SIGQUIT or SIGHUP")
        return name

    @property
    def signum(self) -> int:
        return _signal_number(self.signal)


class SleepSpec(_Model):
    """How a model with ``switchStrategy: sleep`` sleeps, and the limits that
    make vramctl stop it instead (a residue over the limit, too many cycles)."""

    level: Literal[1, 2] = Field(
        default=1,
        description="1: weights copied to host memory, KV cache dropped (wake: a copy back). 2: weights dropped too (wake: reload from disk).",
    )
    max_residue_mib: int = Field(
        default=1536,
        ge=0,
        le=MAX_GPU_MIB,
        description="VRAM the model may keep while asleep (CUDA context, graphs), in MiB; more after a sleep means stop it instead.",
    )
    host_memory_mib: int | None = Field(
        default=None,
        ge=0,
        le=MAX_HOST_MIB,
        description="Level 1: host RAM the weights take while asleep, in MiB (about their size); checkpoint: about 1.1x the VRAM the model holds. Counted against hostMemoryBudgetMiB.",
    )
    max_cycles: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Sleeps before the model is stopped and started cold instead (bounds leaks across cycles); unset: no bound.",
    )
    residue_settle_seconds: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="How long after its sleep returned the model's VRAM may still be over maxResidueMiB (the driver frees "
        "late); past it the sleep goes the cold way (ResidueOverLimit). At most the GPU's memoryTimeoutSeconds.",
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="How long the sleep call may take before the model goes the cold way at once (SleepTimeout). Unset: "
        "10 s plus, per GiB of vramMiB (else hostMemoryMiB), 2 s at level 1 (a copy to pageable host memory) or 0.25 s at level 2.",
    )
    checkpoint: bool = Field(
        default=False,
        description="switchStrategy auto: the NVIDIA driver's checkpoint API (driver 570+, Linux, not WSL2; the process and "
        "docker runtimes) is one more way away, beside sleep and stop, when the driver is available at start; taken when "
        "it is the cheapest away and back and its host memory (about 1.1x the model's VRAM) fits beside the other sleepers. "
        "A model whose checkpoint was refused or fell back is not checkpointed again until vramctl restarts.",
    )
    prewarm: bool = Field(
        default=False,
        description="After the model first becomes ready and no demand waits, sleep and wake it once while idle, so that the "
        "one-time costs of its first sleep (pinning host memory: 8-9 s for a 14 GiB vLLM) are paid off the user's path. "
        "Never while a demand for another model waits.",
    )
    path: str | None = Field(default=None, description="engine container: the path POSTed to sleep (level=N is added to its query).")
    wake_path: str | None = Field(default=None, description="engine container: the path POSTed to wake the model.")
    state_path: str | None = Field(default=None, description='engine container: a GET path answering {"is_sleeping": true|false}.')

    @field_validator("path", "wake_path", "state_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} must start with '/': write /{v}")
        return v


class ModelSpec(_Model):
    """One model server: how to run it, how to know it is ready, what it costs."""

    model_class: Literal["heavy", "light"] = Field(
        default="heavy",
        alias="class",
        description="heavy: at most one per GPU at a time. light: may run beside the heavy one when it fits.",
    )
    engine: EngineName = Field(
        default="container",
        description=(
            "What the model server is. vllm, sdxl, sovits: vramctl renders the server's arguments, environment and health check "
            "from the typed fields of the same name. container: image, args and env are used as written."
        ),
    )
    vllm: VllmSpec | None = Field(default=None, description="engine vllm: the vLLM server's settings.")
    sdxl: SdxlSpec | None = Field(default=None, description="engine sdxl: the SDXL server's settings.")
    sovits: SovitsSpec | None = Field(default=None, description="engine sovits: GPT-SoVITS api_v2.py's settings (all optional).")
    image: str | None = Field(default=None, description="Container image (docker runtime).")
    compose_service: str | None = Field(default=None, description="Service of the docker compose project that creates this container.")
    command: list[str] | None = Field(
        default=None,
        description="Local command (process runtime): the executable and its arguments; an engine's arguments follow it, e.g. [vllm, serve].",
    )
    args: list[str] = Field(
        default_factory=list, description="Arguments: the container's command, or appended to `command`; after an engine's own arguments."
    )
    env: dict[str, EnvValue] = Field(
        default_factory=dict, description="Environment; wins over the GPU's `env`, the SDPA defaults and what an engine renders."
    )
    ports: list[str] = Field(default_factory=list, description="Published ports as HOST:CONTAINER (ignored with network mode host).")
    volumes: list[str] = Field(default_factory=list, description="Bind mounts as SRC:DST[:ro].")
    weights: list[str] = Field(
        default_factory=list,
        description="Files or directories holding the model's weights on the host where vramctl runs: read ahead into the "
        "page cache while another model serves and the queue says this one is next (its start cold), as far as MemAvailable "
        "allows. Default: vllm.model when it is a path, sdxl.modelPath (container paths mapped back through volumes).",
    )
    network_mode: str = Field(default="host", description="Docker network mode of the container.")
    gpu_request: Literal["auto", "always", "never", "runtimeClass", "resource", "none"] = Field(
        default="auto",
        description=(
            "How the model gets the GPU. Docker runtime: ask the engine for it (--gpus device=N); auto: when the engine "
            "lists an nvidia runtime; always: also where it does not list one but --gpus works (CDI, some Docker Desktop "
            "setups); never: no GPU. Pod runtime: runtimeClass (runtimeClassName nvidia + NVIDIA_VISIBLE_DEVICES, light "
            "companions share the card), resource (nvidia.com/gpu: 1, the heavy model only), none; auto: the operator's "
            "--pod-gpu. The Docker runtime takes runtimeClass and resource as auto, none as never."
        ),
    )
    health: HealthSpec | None = Field(
        default=None,
        description="Readiness check; replaces an engine's own (vllm, sdxl: /health; sovits: /docs). Without either, running counts as ready.",
    )
    stop: StopSpec = Field(default_factory=StopSpec)
    start_timeout_seconds: float = Field(default=300.0, gt=0, le=7200, description="Seconds a start may take to become healthy.")
    vram_mib: int | None = Field(
        default=None,
        ge=0,
        le=MAX_GPU_MIB,
        description="VRAM the model holds when loaded, in MiB. engine vllm: used only while the GPU's total is unknown (vLLM takes gpuMemoryUtilization x total).",
    )
    ipc_mode: str | None = Field(
        default=None,
        pattern=r"^(host|private|shareable|none|container:.+)$",
        description="Docker IPC mode, e.g. host (vLLM's shared memory).",
    )
    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="Queue priority of this model's demands (holds, gateway requests): higher goes first, but never past a demand that waited queue.maxServeSeconds.",
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="Name clients use for this model at the gateway (the body's model). Default: vllm.servedModelName, else vllm.model, else the model's name.",
    )
    switch_strategy: Literal["stop", "sleep", "checkpoint", "auto"] = Field(
        default="stop",
        description="How the model gives the GPU away. stop: the server is stopped. sleep: it is put to sleep (vllm, sdxl, or a container with sleep paths), its memory checked down to sleep.maxResidueMiB, and woken when wanted again. auto: at each switch away, sleep or stop (or checkpoint, with sleep.checkpoint and the driver available at start), whichever costs less away and back by the switch costs learned (priors from its size until measured) and fits the host memory, residue and pinned-memory budgets and sleep.maxCycles; the progress says which and why. checkpoint: any CUDA server, suspended from outside by the NVIDIA driver's checkpoint API (driver 570+, Linux, not WSL2; the process and docker runtimes): its GPU memory goes to host memory, every process of it leaves the GPU, and it is restored when wanted again.",
    )
    sleep: SleepSpec | None = Field(
        default=None, description="switchStrategy sleep or checkpoint: the level and limits (default: level 1)."
    )
    gpus: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        default=None,
        description=(
            "A model that needs several GPUs at once (e.g. vLLM with tensor parallelism): every GPU it holds, e.g. [0, 1], "
            "this entry's gpu among them (its worker runs the model); each must have an entry in gpus. It is heavy on each: "
            "it starts only when none of them runs another heavy model and each has its memory free, and while it runs no "
            "other heavy model starts on any of them. The process runtime passes CUDA_VISIBLE_DEVICES=0,1 with "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID, docker a device request for each id. vramMiB is what it holds on each GPU. "
            "switchStrategy stop only, for now. Unset: this entry's gpu alone."
        ),
    )
    placement: Literal["pinned", "any"] = Field(
        default="pinned",
        description=(
            "any: the model is declared, under the same name, in the entries of several GPUs, and the gateway serves each "
            "request on the GPU where it is awake (or being switched to), else where the switch to it is cheapest by that "
            "GPU's switch costs, else on the GPU least recently used. pinned: the gateway serves it where it is first declared."
        ),
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)

    @field_validator("image")
    @classmethod
    def _image_reference(cls, v: str | None) -> str | None:
        if v is not None:
            problem = image_reference_problem(v)
            if problem is not None:
                raise ValueError(problem)
        return v

    @field_validator("ports")
    @classmethod
    def _port_syntax(cls, v: list[str]) -> list[str]:
        for p in v:
            parts = str(p).split(":")
            if len(parts) != 2 or not all(x.isdigit() and 0 < int(x) < 65536 for x in parts):
                raise ValueError(f'port {p!r} is not HOST:CONTAINER with numbers 1-65535, e.g. "8000:8000"')
        return v

    @field_validator("volumes")
    @classmethod
    def _volume_syntax(cls, v: list[str]) -> list[str]:
        for vol in v:
            parts = vol.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
                raise ValueError(f"volume {vol!r} is not SRC:/abs/dst[:ro]")
            if len(parts) == 3 and parts[2] not in ("ro", "rw"):
                raise ValueError(f"volume {vol!r}: the mode must be ro or rw")
        return v

    @model_validator(mode="after")
    def _several_gpus(self) -> ModelSpec:
        if self.gpus is None:
            return self
        if len(set(self.gpus)) != len(self.gpus):
            raise FieldProblem(f"gpus {self.gpus} names a GPU twice: list each GPU once", "gpus")
        if len(self.gpus) < 2:
            raise FieldProblem(f"gpus {self.gpus} lists one GPU: leave gpus out (the entry's gpu is the model's GPU)", "gpus")
        if not self.heavy:
            raise FieldProblem("gpus: a model on several GPUs is heavy on each of them: remove class light, or gpus", "class")
        if self.switch_strategy != "stop":
            raise FieldProblem(
                f"switchStrategy {self.switch_strategy}: a model on several GPUs (gpus) switches by stop only for now: "
                "set switchStrategy stop, or remove gpus",
                "switchStrategy",
            )
        if self.placement != "pinned":
            raise FieldProblem("placement any: a model on several GPUs (gpus) holds all of them: remove placement, or gpus", "placement")
        return self

    @model_validator(mode="after")
    def _has_a_way_to_run(self) -> ModelSpec:
        if self.image is None and self.compose_service is None and not self.command:
            raise ValueError("set one of image, composeService or command: vramctl needs to know how to run this model")
        if self.image is not None and self.compose_service is not None:
            raise ValueError("set image or composeService, not both: compose creates the container of a composeService")
        return self

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelSpec:
        subs = {"vllm": self.vllm, "sdxl": self.sdxl, "sovits": self.sovits}
        for name, sub in subs.items():
            if sub is not None and name != self.engine:
                raise FieldProblem(f"{name} is set but engine is {self.engine}: add `engine: {name}`, or remove {name}", name)
        if self.vllm is not None and self.served_model_name is not None and self.served_model_name != self.vllm.served_model_name:
            raise FieldProblem(
                f"servedModelName {self.served_model_name!r} is not vllm.servedModelName ({self.vllm.served_model_name!r}): "
                "the gateway would send a name vLLM does not serve; set vllm.servedModelName instead",
                "servedModelName",
            )
        if self.engine == "vllm" and self.vllm is None:
            raise FieldProblem("engine vllm needs the vllm settings: add `vllm: {model: <Hugging Face id or path>}`", "vllm")
        if self.engine == "sdxl" and self.sdxl is None:
            raise FieldProblem(
                "engine sdxl needs the sdxl settings: add `sdxl: {modelPath: /models/sdxl/<checkpoint>.safetensors}`", "sdxl"
            )
        if self.engine != "container" and self.compose_service is not None:
            raise FieldProblem(
                f"engine {self.engine} renders the container's command and environment, but compose creates a composeService's container: "
                "use image (vramctl creates the container), or engine: container and set them in the compose file",
                "engine",
            )
        self._check_sleep_fields()
        owned = {"vllm": VLLM_OWNED_FLAGS, "sovits": SOVITS_OWNED_FLAGS}.get(self.engine)
        if owned is not None:
            problems = owned_flag_problems(self.args, owned, "args")
            if problems:
                raise FieldProblem("; ".join(problems), "args")
            # Not for sovits: `python -c ...` is not api_v2.py's -c.
            problems = owned_flag_problems(self.command or [], owned, "command") if self.engine == "vllm" else []
            if problems:
                raise FieldProblem("; ".join(problems), "command")
        return self

    def _check_sleep_fields(self) -> None:
        if self.switch_strategy == "stop":
            if self.sleep is not None:
                raise FieldProblem("sleep is set but switchStrategy is stop: add `switchStrategy: sleep`, or remove sleep", "sleep")
            return
        s = self.sleep_settings
        paths = {"path": s.path, "wakePath": s.wake_path, "statePath": s.state_path}
        if not self.heavy:
            raise FieldProblem(
                f"switchStrategy {self.switch_strategy} is for heavy models (they take turns on the GPU); use stop", "switchStrategy"
            )
        if self.switch_strategy == "checkpoint":
            self._check_checkpoint_fields(paths)
            return
        if s.checkpoint and self.switch_strategy != "auto":
            raise FieldProblem(
                "sleep.checkpoint lets switchStrategy auto choose the driver's checkpoint API: use switchStrategy auto "
                "(or switchStrategy checkpoint to checkpoint at every switch), or remove sleep.checkpoint",
                "sleep.checkpoint",
            )
        if s.checkpoint and self.vram_mib is None and s.host_memory_mib is None:
            raise FieldProblem(
                "sleep.checkpoint keeps the model's GPU memory in host memory (about 1.1x it): set vramMiB or sleep.hostMemoryMiB "
                "so that auto can tell whether it fits",
                "sleep.checkpoint",
            )
        if self.engine in SLEEPING_ENGINES:
            for field, value in paths.items():
                if value is not None:
                    raise FieldProblem(
                        f"engine {self.engine} has its own sleep endpoints (/sleep, /wake_up, /is_sleeping): remove sleep.{field}",
                        f"sleep.{field}",
                    )
        elif self.engine == "container":
            for field in ("path", "wakePath"):
                if paths[field] is None:
                    raise FieldProblem(
                        f"switchStrategy sleep with engine container needs the server's sleep API: set sleep.{field} "
                        "(e.g. path: /sleep, wakePath: /wake_up, statePath: /is_sleeping)",
                        f"sleep.{field}",
                    )
            if self.health is None or self.health.port is None:
                raise FieldProblem(
                    "switchStrategy sleep with engine container calls the sleep paths on the health port: set health.path and health.port",
                    "health",
                )
        else:
            raise FieldProblem(
                f"engine {self.engine} cannot sleep (its server has no sleep API): use switchStrategy stop", "switchStrategy"
            )
        if s.level == 1 and s.host_memory_mib is None:
            raise FieldProblem(
                "sleep level 1 keeps the weights in host memory: set sleep.hostMemoryMiB to about their size "
                "(e.g. 16000 for an 8B model in bf16, 7000 for SDXL in fp16), or use level: 2 (weights reloaded from disk)",
                "sleep.hostMemoryMiB",
            )

    def _check_checkpoint_fields(self, paths: dict[str, str | None]) -> None:
        s = self.sleep_settings
        for field, value in paths.items():
            if value is not None:
                raise FieldProblem(
                    f"switchStrategy checkpoint suspends the server from outside (the driver's checkpoint API): remove sleep.{field}",
                    f"sleep.{field}",
                )
        if s.level != 1:
            raise FieldProblem("switchStrategy checkpoint keeps everything in host memory: remove sleep.level", "sleep.level")
        if s.checkpoint:
            raise FieldProblem(
                "switchStrategy checkpoint checkpoints at every switch: remove sleep.checkpoint (it is for switchStrategy auto)",
                "sleep.checkpoint",
            )
        if s.host_memory_mib is None:
            raise FieldProblem(
                "switchStrategy checkpoint keeps the model's GPU memory in host memory: set sleep.hostMemoryMiB to about 1.1x "
                "the VRAM it holds (e.g. 18000 for 16 GiB)",
                "sleep.hostMemoryMiB",
            )

    @property
    def heavy(self) -> bool:
        return self.model_class == "heavy"

    @property
    def warm_switch(self) -> bool:
        """The model may give the GPU away without a stop: switchStrategy sleep, checkpoint or auto."""
        return self.switch_strategy != "stop"

    @property
    def weight_paths(self) -> tuple[str, ...]:
        """``weights``, else the engine's model path (vllm.model when it is a
        path, sdxl.modelPath), mapped back to the host through ``volumes`` when
        the model runs in a container (a path no volume holds is dropped)."""
        if self.weights:
            return tuple(self.weights)
        paths = [p for p in (self.vllm.model if self.vllm is not None else None, self.sdxl.model_path if self.sdxl else None) if p]
        paths = [p for p in paths if p.startswith("/")]
        if self.command is not None and self.image is None and self.compose_service is None:
            return tuple(paths)  # a local process sees the host's paths
        out = []
        for p in paths:
            for v in self.volumes:
                src, _, rest = v.partition(":")
                dst = rest.split(":", 1)[0]
                if src.startswith("/") and dst and (p == dst or p.startswith(dst.rstrip("/") + "/")):
                    out.append(src.rstrip("/") + p[len(dst.rstrip("/")) :])
                    break
        return tuple(out)

    @property
    def sleeps_by_api(self) -> bool:
        """Its server's sleep API is used: switchStrategy sleep, or auto (sleep or stop, per switch)."""
        return self.switch_strategy in ("sleep", "auto")

    @property
    def auto_checkpoint(self) -> bool:
        """switchStrategy auto may take the driver's checkpoint API (``sleep.checkpoint``)."""
        return self.switch_strategy == "auto" and self.sleep_settings.checkpoint

    @property
    def sleep_settings(self) -> SleepSpec:
        """``sleep``, or its defaults."""
        return self.sleep or SleepSpec()

    @property
    def sleep_timeout_seconds(self) -> float:
        """``sleep.timeoutSeconds``, or a default from the model's size and level
        (unknown size: 60 s)."""
        s = self.sleep_settings
        if s.timeout_seconds is not None:
            return s.timeout_seconds
        size_mib = self.vram_mib or s.host_memory_mib
        if not size_mib:
            return 60.0
        per_gib = 2.0 if s.level == 1 else 0.25
        return round(10.0 + per_gib * size_mib / 1024, 1)

    @property
    def sleep_api(self) -> SleepApi | None:
        """How to sleep, wake and query this model; None unless switchStrategy is sleep or auto."""
        if not self.sleeps_by_api:
            return None
        s = self.sleep_settings
        return sleep_api(self.engine, s.path, s.wake_path, s.state_path)

    @property
    def host_memory_asleep_mib(self) -> int:
        """Host RAM this model holds while asleep (level 1 or checkpoint), in MiB; 0 otherwise."""
        if not self.warm_switch or self.sleep_settings.level != 1:
            return 0
        return self.sleep_settings.host_memory_mib or 0

    def rendering(self) -> Rendering:
        """What the model's engine contributes (nothing for engine container)."""
        sleeps = self.sleeps_by_api
        if self.vllm is not None:
            return render_vllm(self.vllm, sleep=sleeps)
        if self.sdxl is not None:
            return render_sdxl(self.sdxl, pin_for_sleep=sleeps and self.sleep_settings.level == 1)
        if self.engine == "sovits":
            return render_sovits(self.sovits or SovitsSpec())
        return CONTAINER


@dataclass(frozen=True)
class Reservation:
    """VRAM a model takes, in MiB; ``formula`` says how it was found when that
    was not simply its vramMiB (e.g. ``0.85 x 16303 MiB``)."""

    mib: int
    formula: str | None = None

    def describe(self) -> str:
        return f"{self.mib} ({self.formula})" if self.formula else str(self.mib)


class EnvPolicySpec(_Model):
    """Environment vramctl injects into every model by itself."""

    sdpa_defaults: bool = Field(
        default=True,
        description=(
            "Inject XFORMERS_DISABLED=1, VLLM_USE_TRITON_FLASH_ATTN=0 and PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512 "
            "(PyTorch SDPA, never xformers) into every model; the GPU's env and a model's env override them."
        ),
    )


def _check_env(v: Mapping[str, str]) -> dict[str, str]:
    for k in v:
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"environment variable name {k!r} is invalid: use letters, digits and _")
    return dict(v)


class SwitchingSpec(_Model):
    """Who decides which model runs: the spec (declared) or the clients (onDemand)."""

    mode: Literal["declared", "onDemand"] = Field(
        default="declared",
        description="declared: activeModel decides; holds for other models are refused. onDemand: holds and gateway requests decide.",
    )
    default_model: str | None = Field(
        default=None, description="onDemand: the heavy model run when nobody asks (default: activeModel); also idle's default."
    )


class QueueSpec(_Model):
    """The GPU's demand queue (holds, gateway requests, switches)."""

    max_queue: int = Field(default=512, ge=1, le=100_000, description="Waiting demands beyond this are refused with 503 and Retry-After.")
    queue_timeout_seconds: float = Field(
        default=300.0, gt=0, le=86400, description="A demand not served within this is refused with 503 and Retry-After."
    )
    max_serve_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="Anti-thrash: the active model keeps getting new demands for at most this long while a demand for another model waits.",
    )
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        le=86400,
        description="A switch away waits this long at most for the active model's holds to end; then they are revoked (renew answers 409).",
    )
    serve_cost_factor: float | None = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="Anti-thrash follows the switch it avoids: while a demand for another model waits, the active model keeps "
        "getting new demands for this many times the learned cost of a switch there and back (0.5 s warm: seconds; cold: "
        "bursts kept together), never longer than maxServeSeconds - drainTimeoutSeconds. Null: always that fixed window.",
    )

    @model_validator(mode="after")
    def _timeout_covers_a_turn(self) -> QueueSpec:
        turn = self.max_serve_seconds + self.drain_timeout_seconds
        if self.queue_timeout_seconds < turn:
            raise FieldProblem(
                f"queueTimeoutSeconds {self.queue_timeout_seconds:g} is shorter than maxServeSeconds + drainTimeoutSeconds = {turn:g}: "
                "a demand for another model would time out before its turn; raise queueTimeoutSeconds or lower the others",
                "queueTimeoutSeconds",
            )
        return self


class IdleSpec(_Model):
    """What to do when nothing was held, queued or requested for a while."""

    after_seconds: float | None = Field(default=None, gt=0, le=7 * 86400, description="Quiet time before the idle action; unset: never.")
    sleep_after_seconds: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86400,
        description="Two-stage idle, first stage: after this much quiet time the active model is put to sleep (it keeps its "
        "CUDA context and host memory; a model that cannot sleep is stopped). Shorthand for afterSeconds with action sleep.",
    )
    stop_after_seconds: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86400,
        description="Two-stage idle, second stage: after this much quiet time (counted from the last use, like the first) "
        "every model is stopped, sleepers too: power, CUDA context and host memory given back.",
    )
    action: Literal["default", "sleep", "free"] = Field(
        default="default",
        description="default: switch to the default model; sleep: put the active model to sleep (engines that can); free: stop it.",
    )
    default_model: str | None = Field(default=None, description="The model of action default (default: switching.defaultModel).")


class DeploymentSpec(_Model):
    """Everything vramctl needs to know about one GPU (a ModelDeployment's spec)."""

    name: str | None = Field(default=None, description="Name in compose mode; a ModelDeployment uses metadata.name.")
    node_name: str | None = Field(default=None, description="Kubernetes node whose vramctl instance acts on this GPU.")
    gpu: int = Field(default=0, ge=0, le=63, description="GPU index on the node.")
    active_model: str | None = Field(default=None, description="Heavy model that should hold the GPU; empty frees it.")
    companions: list[str] = Field(default_factory=list, description="Light models to run beside the active one.")
    vram_budget_mib: int | None = Field(
        default=None, ge=1, le=MAX_GPU_MIB, description="VRAM vramctl may plan with, in MiB. Default: total minus a 512 MiB margin."
    )
    host_memory_budget_mib: int | None = Field(
        default=None,
        ge=1,
        le=MAX_HOST_MIB,
        description=(
            "Host RAM the sleeping models' weights may take, in MiB (the sum of their sleep.hostMemoryMiB, level 1). "
            "Default: MemAvailable at start minus a margin (10% of MemTotal, at least 2 GiB); the status shows it as hostMemoryBudget. "
            "Sleepers over it are stopped, least recently used first."
        ),
    )
    pinned_memory_ceiling_mib: int | None = Field(
        default=None,
        ge=0,
        le=MAX_HOST_MIB,
        description="Host memory that can be pinned (page-locked) for level-1 sleepers, in MiB; switchStrategy auto stops a "
        "model whose sleep would pin more. Default: probed at start (WSL2 and Docker Desktop: 768 MiB, their measured "
        "ceiling is 0.75-1 GiB; elsewhere no ceiling).",
    )
    env: dict[str, EnvValue] = Field(
        default_factory=dict,
        description="Environment injected into every model; overrides the SDPA defaults, a model's env and its engine's override it.",
    )
    env_policy: EnvPolicySpec = Field(default_factory=EnvPolicySpec, description="What vramctl injects into every model by itself.")
    models: dict[str, ModelSpec] = Field(min_length=1, description="The model servers that may run on this GPU, by name.")
    switching: SwitchingSpec = Field(default_factory=SwitchingSpec, description="Who decides which model runs.")
    queue: QueueSpec = Field(default_factory=QueueSpec, description="The demand queue (onDemand switching, holds, the gateway).")
    idle: IdleSpec = Field(default_factory=IdleSpec, description="What to do after a quiet period.")
    on_removed: Literal["recreate", "release"] = Field(
        default="recreate",
        description=(
            "A running model's container removed outside vramctl (docker compose down, docker rm): "
            "recreate it (said in status and log), or release: free the GPU (run `vramctl switch ''` before `down` either way)."
        ),
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_env(v)

    @field_validator("active_model")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in v:
            if not MODEL_NAME_RE.match(name):
                raise ValueError(
                    f"model name {name!r} is invalid: use 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit"
                )
        return v

    @model_validator(mode="after")
    def _references(self) -> DeploymentSpec:
        check_desired(self, self.active_model, self.companions)
        self._check_switching()
        check_sleep(self)
        return self

    def _check_switching(self) -> None:
        for path, name in (("switching.defaultModel", self.switching.default_model), ("idle.defaultModel", self.idle.default_model)):
            if name is None:
                continue
            if name not in self.models:
                raise FieldProblem(f"{path} {name!r} is not one of the models: {', '.join(sorted(self.models))}", path)
            if not self.models[name].heavy:
                raise FieldProblem(f"{path} {name!r} is class light: name a heavy model", path)
        idle = self.idle
        if idle.sleep_after_seconds is not None and idle.after_seconds is not None:
            raise FieldProblem("idle.sleepAfterSeconds is afterSeconds with action sleep: set one of them", "idle.sleepAfterSeconds")
        first = idle.sleep_after_seconds if idle.sleep_after_seconds is not None else idle.after_seconds
        if idle.stop_after_seconds is not None and first is not None and idle.stop_after_seconds <= first:
            raise FieldProblem(
                f"idle.stopAfterSeconds {idle.stop_after_seconds:g} must be longer than the first stage ({first:g} s): "
                "both count from the last use",
                "idle.stopAfterSeconds",
            )
        if self.idle.after_seconds is not None and self.idle.action == "default" and self.idle_default_model is None:
            raise FieldProblem(
                "idle.action default needs a model to return to: set idle.defaultModel (or switching.defaultModel)", "idle.defaultModel"
            )
        for name, m in self.models.items():
            if m.gpus is not None and self.gpu not in m.gpus:
                raise FieldProblem(
                    f"gpus {m.gpus} leaves out this entry's gpu {self.gpu}: a model on several GPUs is declared in the entry "
                    "of one of them (whose worker runs it); add it, or move the model",
                    f"models.{name}.gpus",
                )
        seen: dict[str, str] = {}
        for name in self.models:
            for alias in {name, self.served_name(name)}:
                other = seen.setdefault(alias, name)
                if other != name:
                    raise FieldProblem(
                        f"models {other!r} and {name!r} are both reached as {alias!r} at the gateway: give one another servedModelName",
                        f"models.{name}.servedModelName",
                    )

    @property
    def idle_default_model(self) -> str | None:
        """The model idle action default returns to."""
        return self.idle.default_model or self.switching.default_model

    def served_name(self, model: str) -> str:
        """What clients call ``model`` at the gateway: servedModelName, else
        vllm.servedModelName, else vllm.model (vLLM serves under it), else the name."""
        m = self.models[model]
        if m.served_model_name:
            return m.served_model_name
        if m.vllm is not None:
            return m.vllm.served_model_name or m.vllm.model
        return model

    @property
    def display_name(self) -> str:
        return self.name or f"gpu{self.gpu}"

    def gpus_of(self, model: str) -> tuple[int, ...]:
        """The GPUs ``model`` holds: its ``gpus`` (sorted), else this entry's gpu."""
        m = self.models[model]
        return tuple(sorted(m.gpus)) if m.gpus is not None else (self.gpu,)

    def merged_env(self, model: str) -> dict[str, str]:
        """A model's environment, later entries winning: the SDPA defaults
        (unless envPolicy.sdpaDefaults is false), the GPU's env, what the
        model's engine renders, the model's own env."""
        m = self.models[model]
        defaults = SDPA_DEFAULT_ENV if self.env_policy.sdpa_defaults else {}
        return {**defaults, **self.env, **m.rendering().env, **m.env}

    def secrets(self) -> frozenset[str]:
        """The secret values in the models' rendered arguments and environment
        (``--api-key`` values, secret-named variables): masked wherever status
        or logs show text that may contain them."""
        found: set[str] = set()
        for m in self.models:
            try:
                argv = [*(self.container_command(m) or []), *self.process_argv(m)]
                found |= secrets_in(argv, self.merged_env(m))
            except Exception:  # a model that cannot render has no arguments to leak
                continue
        return frozenset(found)

    def container_command(self, model: str) -> list[str] | None:
        """The container's command: the engine's program and flags, then the
        model's args. None keeps the image's own CMD."""
        m = self.models[model]
        r = m.rendering()
        return [*r.program, *r.args, *m.args] or None

    def process_argv(self, model: str) -> list[str]:
        """A local process's argv: ``command``, the engine's flags, ``args``.
        Empty when the model has no command."""
        m = self.models[model]
        if not m.command:
            return []
        return [*m.command, *m.rendering().args, *m.args]

    def health_of(self, model: str) -> HealthSpec | None:
        """The model's readiness check: its own ``health``, else its engine's."""
        m = self.models[model]
        if m.health is not None:
            return m.health
        r = m.rendering()
        if r.health_path is None or r.port is None:
            return None
        return HealthSpec(path=r.health_path, port=r.port, host=r.health_host)

    def reservation(self, model: str, total_mib: int | None = None) -> Reservation | None:
        """VRAM the model takes on this GPU; None when nothing says.

        vLLM reserves gpuMemoryUtilization x the GPU's total at start,
        whatever its weights weigh. While the total is unknown (parsing,
        before the first probe) its vramMiB stands in, else
        gpuMemoryUtilization x vramBudgetMiB (a lower bound: the budget is
        at most the total). Other engines: vramMiB.
        """
        m = self.models[model]
        v = m.vllm
        if v is not None:
            util = f"{v.gpu_memory_utilization:g}"
            if total_mib is not None:
                return Reservation(v.reservation_mib(total_mib), f"{util} x {total_mib} MiB")
            if m.vram_mib is None and self.vram_budget_mib is not None:
                return Reservation(v.reservation_mib(self.vram_budget_mib), f"{util} x vramBudgetMiB {self.vram_budget_mib}")
        return Reservation(m.vram_mib) if m.vram_mib is not None else None

    def reservation_mib(self, model: str, total_mib: int | None = None) -> int | None:
        """``reservation(...).mib``: what the planner and the budget check count."""
        r = self.reservation(model, total_mib)
        return r.mib if r is not None else None

    def spec_hash(self, model: str) -> str:
        """Hash of everything that shapes a model's container or process
        (the rendered command, argv and environment included); a change
        means recreate."""
        m = self.models[model]
        # Not in the hash: what only vramctl reads (a change must not recreate the container).
        # switchStrategy and sleep reach the server only through the rendering (hashed below).
        vramctl_only = {
            "health",
            "start_timeout_seconds",
            "vram_mib",
            "model_class",
            "priority",
            "served_model_name",
            "switch_strategy",
            "sleep",
            "placement",
            "gpus",
        }
        payload = m.model_dump(mode="json", by_alias=True, exclude=vramctl_only)
        payload["env"] = self.merged_env(model)
        payload["containerCommand"] = self.container_command(model)
        payload["processArgv"] = self.process_argv(model)
        payload["gpu"] = self.gpu
        if m.gpus is not None:  # the GPUs it sees (absent for one GPU: the hash of such a model is unchanged)
            payload["gpus"] = sorted(m.gpus)
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DesiredStateError(FieldProblem):
    """A requested active model or companion set that the spec cannot honour."""


def check_desired(spec: DeploymentSpec, active: str | None, companions: Iterable[str], total_mib: int | None = None) -> None:
    """Raise DesiredStateError when ``active`` + ``companions`` is not a valid choice.

    The budget arithmetic is spelled out in the message so the user can see
    which number to change.
    """
    companions = list(companions)
    names = sorted(spec.models)
    if active is not None:
        if active not in spec.models:
            raise DesiredStateError(f"activeModel {active!r} is not one of the models: {', '.join(names)}", "activeModel")
        if not spec.models[active].heavy:
            raise DesiredStateError(
                f"activeModel {active!r} is class light: put it in companions, or set its class to heavy", "activeModel"
            )
    for i, c in enumerate(companions):
        if c not in spec.models:
            raise DesiredStateError(f"companion {c!r} is not one of the models: {', '.join(names)}", f"companions[{i}]")
        if spec.models[c].heavy:
            raise DesiredStateError(f"companion {c!r} is class heavy: only light models can run beside the active one", f"companions[{i}]")
        if c == active:
            raise DesiredStateError(f"companion {c!r} is also the activeModel", f"companions[{i}]")
    if len(set(companions)) != len(companions):
        raise DesiredStateError("companions lists a model twice: list each companion once", "companions")
    budget = spec.vram_budget_mib
    if budget is None and total_mib is not None:
        budget = total_mib - DEFAULT_MARGIN_MIB
    if budget is not None and companions:
        members = ([active] if active else []) + companions
        costs = [(m, spec.reservation(m, total_mib) or Reservation(0)) for m in members]
        total = sum(r.mib for _, r in costs)
        if total > budget:
            arithmetic = " + ".join(f"{m} {r.describe()}" for m, r in costs)
            lower = (
                "lower vllm.gpuMemoryUtilization or a model's vramMiB" if any(r.formula for _, r in costs) else "lower a model's vramMiB"
            )
            raise DesiredStateError(
                f"companions do not fit: {arithmetic} = {total} MiB > vramBudgetMiB {budget} MiB; "
                f"drop a companion, {lower}, or raise vramBudgetMiB",
                "companions",
            )


def check_sleep(spec: DeploymentSpec, total_mib: int | None = None, host_budget_mib: int | None = None) -> None:
    """Raise FieldProblem when the sleeping models cannot fit.

    Host memory: the level-1 sleepers' ``hostMemoryMiB``, all together (their
    host buffers are pinned at load and held while awake too), must fit
    ``hostMemoryBudgetMiB``, else ``host_budget_mib`` (the default read from
    MemAvailable; unchecked when neither is known). VRAM: for each heavy
    model, its reservation plus every other sleeper's ``maxResidueMiB`` must
    fit the VRAM budget (vramBudgetMiB, else total minus the margin; unchecked
    while neither is known). The worst case is spelled out. A model with
    ``switchStrategy: auto`` is not counted: it is stopped when its sleep
    would not fit (``costs.choose_way``).
    """
    sleepers = sorted(n for n, m in spec.models.items() if m.warm_switch and m.switch_strategy != "auto")
    if not sleepers:
        return
    host = [(n, spec.models[n].host_memory_asleep_mib) for n in sleepers if spec.models[n].host_memory_asleep_mib]
    budget_host = spec.host_memory_budget_mib or host_budget_mib
    if budget_host is not None and sum(mib for _, mib in host) > budget_host:
        what = f"hostMemoryBudgetMiB {budget_host}" if spec.host_memory_budget_mib else f"the default host memory budget {budget_host}"
        arithmetic = " + ".join(f"{n} {mib}" for n, mib in host)
        raise FieldProblem(
            f"sleeping models' weights do not fit host memory: {arithmetic} = {sum(mib for _, mib in host)} MiB (sleep.hostMemoryMiB, level 1) "
            f"> {what} MiB; use sleep level 2 or switchStrategy stop for one of them, or raise hostMemoryBudgetMiB",
            "hostMemoryBudgetMiB",
        )
    budget = spec.vram_budget_mib
    if budget is None and total_mib is not None:
        budget = total_mib - DEFAULT_MARGIN_MIB
    if budget is None:
        return
    worst: tuple[int, str] | None = None
    for name in sorted(n for n, m in spec.models.items() if m.heavy):
        r = spec.reservation(name, total_mib)
        if r is None:
            continue
        residues = [(s, spec.models[s].sleep_settings.max_residue_mib) for s in sleepers if s != name]
        if not residues:
            continue
        total = r.mib + sum(mib for _, mib in residues)
        if worst is None or total > worst[0]:
            parts = [f"{name} {r.describe()}", *(f"{s} asleep {mib}" for s, mib in residues)]
            worst = (total, " + ".join(parts))
    if worst is not None and worst[0] > budget:
        where = f"vramBudgetMiB {budget}" if spec.vram_budget_mib is not None else f"the budget {budget} (total minus {DEFAULT_MARGIN_MIB})"
        raise FieldProblem(
            f"sleeping models' residues do not fit beside the largest heavy model: {worst[1]} = {worst[0]} MiB > {where} MiB; "
            "lower sleep.maxResidueMiB, use switchStrategy stop for a model, or lower the largest model's reservation",
            f"models.{sleepers[0]}.sleep.maxResidueMiB",
        )


class GpuProbeConfig(_Model):
    kind: Literal["auto", "nvml", "simulated"] = Field(default="auto", description="auto: NVML when it loads, else simulated.")
    total_mib: int = Field(default=16303, ge=1, le=MAX_GPU_MIB, description="Simulated GPU: total memory in MiB.")
    baseline_mib: int = Field(default=0, ge=0, le=MAX_GPU_MIB, description="Simulated GPU: memory used with no model loaded.")
    release_delay_seconds: float = Field(
        default=0.3, ge=0, le=60, description="Simulated GPU: memory is freed this long after a workload exits."
    )
    poll_interval_seconds: float = Field(
        default=0.05, ge=0.005, le=5, description="How often memory is polled while waiting for it (at least 5 ms)."
    )
    margin_mib: int = Field(
        default=256, ge=0, le=MAX_GPU_MIB, description="Used memory may exceed the baseline by this much and count as free."
    )
    memory_timeout_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="How long to wait for memory before the phase becomes Blocked."
    )


class ComposeConfig(_Model):
    project: str = Field(description="docker compose project name (COMPOSE_PROJECT_NAME).")
    files: list[str] = Field(
        default_factory=list, description="Compose files, used to create a service's container when it does not exist yet."
    )
    project_directory: str | None = Field(default=None, description="Compose project directory.")


class MetricsConfig(_Model):
    dcgm_compat: bool = Field(
        default=False,
        description="Also export DCGM_FI_DEV_* series (FB_USED, FB_FREE, GPU_UTIL, GPU_TEMP, POWER_USAGE) so dcgm-exporter dashboards work without DCGM.",
    )


class Config(_Model):
    """The compose-mode / standalone config file."""

    runtime: Literal["auto", "docker", "process"] = Field(default="auto", description="auto: docker when an engine answers, else process.")
    compose: ComposeConfig | None = Field(default=None, description="Adopt the containers of this docker compose project.")
    gpu_probe: GpuProbeConfig = Field(default_factory=GpuProbeConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    backoff_initial_seconds: float = Field(
        default=2.0, ge=0.1, le=600, description="Wait after a failed start before retrying; doubles each time."
    )
    backoff_max_seconds: float = Field(default=300.0, gt=0, le=86400, description="Upper bound of the retry wait.")
    resync_seconds: float = Field(default=5.0, ge=0.5, le=3600, description="A worker re-observes at least this often.")
    gpus: Annotated[list[DeploymentSpec], Field(min_length=1, description="One entry per GPU.")]

    @model_validator(mode="after")
    def _unique_gpus(self) -> Config:
        seen: set[int] = set()
        for i, d in enumerate(self.gpus):
            if d.gpu in seen:
                raise FieldProblem(f"gpu {d.gpu} appears twice in gpus: one entry per GPU", f"gpus[{i}].gpu")
            seen.add(d.gpu)
        for i, d in enumerate(self.gpus):
            for name, m in d.models.items():
                missing = sorted(set(m.gpus or ()) - seen)
                if missing:
                    raise FieldProblem(
                        f"gpus {m.gpus} names gpu {', '.join(map(str, missing))}, which has no entry in gpus: add one "
                        "(its own models may be light), or remove it from the model's gpus",
                        f"gpus[{i}].models.{name}.gpus",
                    )
        return self


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` are (field path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        lines += [f"  {path}: {msg}" for path, msg in self.problems]
        return "\n".join(lines)


def _camel_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # An env key is the user's name, not a field: STANDIN_PORT stays STANDIN_PORT.
            as_written = part == "class" or previous == "env" or "_" not in part
            out += ("." if out else "") + (part if as_written else _alias(part))
        previous = part
    return out or "(top level)"


def _join_path(path: str, field: str | None) -> str:
    if not field:
        return path
    if path == "(top level)":
        return field
    return path + ("" if field.startswith("[") else ".") + field


def _known_keys() -> frozenset[str]:
    """Every key a config or spec may hold, as written (the fields' aliases)."""
    out: set[str] = set()
    todo: list[type[BaseModel]] = [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__ in (__name__, "vramctl.spec.engines"):
                out.update(f.alias or name for name, f in sub.model_fields.items())
    return frozenset(out)


def _meant(key: str) -> str | None:
    """The key an unknown ``key`` was probably meant to be: its camelCase
    (vram_mib -> vramMiB), the same letters in another case, or a close spelling."""
    known = _known_keys()
    camel = _alias(key)
    if camel != key and camel in known:
        return camel
    folded = {k.lower(): k for k in known}
    if key.lower().replace("_", "") in folded:
        return folded[key.lower().replace("_", "")]
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return close[0] if close else None


def problems_from(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        field = getattr((e.get("ctx") or {}).get("error"), "field", None)
        if e["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            # The key as the user wrote it, not converted like a field name.
            key, loc = loc[-1], loc[:-1]
            field = key
            meant = _meant(key)
            if meant is None:
                msg = "unknown field: check its spelling (fields are camelCase, e.g. vramMiB, activeModel)"
            elif meant == key:
                msg = f"unknown field here: {key} is a field of another part of the config; check its indentation"
            else:
                msg = f"unknown field: check its spelling, did you mean {meant}?"
                if "_" in key:
                    msg += " (fields are camelCase; snake_case keys are not read)"
                elif key.lower() == meant.lower():
                    msg += " (fields are camelCase, with units spelled MiB)"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field: check its spelling (fields are camelCase, e.g. vramMiB, activeModel)"
        elif e["type"] == "int_parsing_size":
            msg = "the number is far too large for this field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "too_short":
            msg = f"{msg}: it must not be empty, add at least one entry"
        out.append((_join_path(_camel_path(loc), field), msg))
    return out


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a loaded YAML document. A single GPU's spec may be given bare."""
    if isinstance(data, dict) and "models" in data and "gpus" not in data:
        data = {"gpus": [data]}
    try:
        # Keys as documented only (camelCase): a snake_case key is refused
        # with the key it meant, never read silently.
        return Config.model_validate(data, by_name=False)
    except ValidationError as err:
        raise ConfigError(source, problems_from(err)) from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        data = yamlfile.load(p)
    except OSError as err:
        raise ConfigError(str(p), [("(file)", f"cannot read: {err.strerror}")]) from None
    except yamlfile.YamlFileError as err:
        raise ConfigError(str(p), [(err.where, err.message)]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), [("(top level)", "expected a mapping with `gpus:` (or a single GPU's `models:`)")])
    return parse_config(data, str(p))

"""The model servers vramctl knows by name, and what each one renders.

A model says ``engine: vllm | sdxl | sovits | container``. For the first
three the user writes typed fields (``vllm.gpuMemoryUtilization``,
``sdxl.modelPath``, ...) instead of raw flags, and this module turns them into
what a container or a process needs: the server's arguments, its environment,
its health path and port, and (vLLM) the VRAM it reserves. ``container`` is
the generic engine: nothing is rendered, ``image``/``args``/``env`` are used
as written.

Why typed fields: vLLM reserves ``gpuMemoryUtilization x total`` at start,
whatever the size of its weights, and that number decides whether a companion
fits. A flag buried in ``args`` cannot be planned with; a typed field can,
and the same field renders the flag, so the two never disagree.

This module is pure (no I/O) and imports nothing else of vramctl:
``spec.py`` composes these sub-specs into a model and merges their rendering
with the model's own ``args``, ``env`` and ``health``.

What each engine renders (the contract its image must keep):

- ``vllm``: flags for the ``vllm/vllm-openai`` image, whose entrypoint is the
  OpenAI server (``vllm serve``), so the flags are the container's command.
  Health ``GET /health`` on ``port``. ``enableSleepMode`` (or the model's
  ``switchStrategy: sleep``) also sets ``VLLM_SERVER_DEV_MODE=1``, which the
  ``/sleep``, ``/wake_up`` and ``/is_sleeping`` endpoints need.
- ``sdxl``: environment for the ``images/sdxl`` server (its ``server.py``
  documents the same names): ``SDXL_MODEL``, ``SDXL_DTYPE`` (only when set:
  the server picks float16 on CUDA), ``SDXL_VAE_SLICING`` (``1``/``0``),
  ``SDXL_VAE_TILING`` (``auto``: tile only above 1024 px on a side; ``1``/
  ``0``), ``SDXL_LORAS`` (``path:weight,...``, only when set) and ``PORT``.
  Health ``GET /health``. ``switchStrategy: sleep`` with level 1 also sets
  ``SDXL_SLEEP=1``: the server pins host buffers for its weights at load
  time, so a sleep is a copy, not an allocation.
- ``sovits``: ``python api_v2.py -a BIND -p PORT [-c CONFIG]`` (GPT-SoVITS's
  API server binds 127.0.0.1 unless told otherwise). It has no health
  endpoint: ``GET /docs`` answers once the server is up.

How each engine sleeps (``sleep_api``): vllm and sdxl ``POST /sleep?level=N``
(vllm also ``mode=wait``: in-flight requests finish first; versions without
modes ignore the parameter), ``POST /wake_up``, ``GET /is_sleeping``
answering ``{"is_sleeping": bool}``; container the paths the user declares;
sovits cannot sleep.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

EngineName = Literal["container", "vllm", "sdxl", "sovits"]
# Engines whose server has a sleep API of its own (container: when declared).
SLEEPING_ENGINES: frozenset[str] = frozenset({"vllm", "sdxl"})
AttentionBackend = Literal["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"]
VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
SdxlDtype = Literal["float16", "bfloat16", "float32"]

# Flags vramctl itself relies on (the reservation, the health port, what is
# served): a copy in args/extraArgs would silently override the typed field.
VLLM_OWNED_FLAGS: Mapping[str, str] = {
    "--model": "vllm.model",
    "--gpu-memory-utilization": "vllm.gpuMemoryUtilization",
    "--port": "vllm.port",
}
SOVITS_OWNED_FLAGS: Mapping[str, str] = {
    "-a": "sovits.bind",
    "--bind_addr": "sovits.bind",
    "-p": "sovits.port",
    "--port": "sovits.port",
    "-c": "sovits.config",
    "--tts_config": "sovits.config",
}
SOVITS_PROGRAM = ("python", "api_v2.py")


class _EngineModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def flag_name(arg: str) -> str | None:
    """``--max-model-len=8192`` -> ``--max-model-len``; None for a value."""
    if not arg.startswith("-") or arg == "-" or _is_number(arg):
        return None
    return arg.split("=", 1)[0]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def owned_flag_problems(args: Iterable[str], owned: Mapping[str, str], where: str) -> list[str]:
    """Messages for each flag of ``args`` that a typed field renders itself."""
    # vLLM's parser takes --max_model_len for --max-model-len: compare both spellings.
    by_norm = {k.replace("_", "-"): (k, v) for k, v in owned.items()}
    out = []
    for a in args:
        name = flag_name(a)
        hit = by_norm.get(name.replace("_", "-")) if name is not None else None
        if hit is not None:
            out.append(f"{name} in {where}: set {hit[1]} instead (vramctl renders {hit[0]} from it and relies on its value)")
    return out


def _num(x: float) -> str:
    """0.85 -> "0.85", 4.0 -> "4", 1234567.0 -> "1234567": what a person would type."""
    return str(int(x)) if x == int(x) else repr(x)


# ------------------------------------------------------------------ vLLM


class VllmSpec(_EngineModel):
    """A vLLM OpenAI-compatible server (the ``vllm/vllm-openai`` image)."""

    model: str = Field(min_length=1, description="Model to serve: a Hugging Face id or a path in the container (--model).")
    served_model_name: str | None = Field(default=None, min_length=1, description="Name clients use in requests (--served-model-name).")
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description=(
            "Fraction of the GPU's total memory vLLM reserves at start for weights, activations and KV cache "
            "(--gpu-memory-utilization; vLLM's default 0.9). vramctl plans with gpuMemoryUtilization x total MiB, not the weights' size."
        ),
    )
    max_model_len: int | None = Field(default=None, ge=1, description="Context length in tokens (--max-model-len).")
    dtype: VllmDtype | None = Field(default=None, description="Weights and activations dtype (--dtype); unset: vLLM's auto.")
    quantization: str | None = Field(
        default=None, pattern=r"^[a-z0-9_-]+$", max_length=64, description="Quantization method, e.g. awq, gptq, fp8 (--quantization)."
    )
    kv_cache_dtype: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]+$", max_length=32, description="KV cache dtype, e.g. auto, fp8, fp8_e4m3 (--kv-cache-dtype)."
    )
    enable_prefix_caching: bool | None = Field(
        default=None,
        description="true: --enable-prefix-caching; false: --no-enable-prefix-caching; unset: vLLM's default (on in current vLLM).",
    )
    max_num_seqs: int | None = Field(default=None, ge=1, description="Most sequences in one batch (--max-num-seqs).")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="Most tokens in one batch (--max-num-batched-tokens).")
    attention_backend: AttentionBackend | None = Field(
        default=None,
        description=(
            "Attention backend (--attention-backend); unset: vLLM picks one. Replaces the VLLM_ATTENTION_BACKEND variable, "
            "which current vLLM ignores. TORCH_SDPA is not a CUDA backend for text models."
        ),
    )
    cpu_offload_gb: float | None = Field(
        default=None, ge=0, alias="cpuOffloadGB", description="GiB of weights kept in CPU memory (--cpu-offload-gb)."
    )
    enable_sleep_mode: bool = Field(
        default=False,
        description=(
            "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1: POST /sleep and /wake_up become available. "
            "Frees nothing with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."
        ),
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI API and of GET /health (--port).")
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM flags, appended after the rendered ones, e.g. [--enforce-eager]."
    )

    @field_validator("extra_args")
    @classmethod
    def _no_owned_flags(cls, v: list[str]) -> list[str]:
        problems = owned_flag_problems(v, VLLM_OWNED_FLAGS, "vllm.extraArgs")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    def reservation_mib(self, total_mib: int) -> int:
        """What vLLM takes of a GPU of ``total_mib``: gpuMemoryUtilization x total, rounded up.

        (Rounded to 6 places first: 0.7 x 10000 is 7000, not 7001.)
        """
        return math.ceil(round(self.gpu_memory_utilization * total_mib, 6))

    def flags(self) -> list[str]:
        """The typed fields as vLLM flags, then ``extraArgs``."""
        a = ["--model", self.model]
        if self.served_model_name is not None:
            a += ["--served-model-name", self.served_model_name]
        a += ["--gpu-memory-utilization", _num(self.gpu_memory_utilization)]
        if self.max_model_len is not None:
            a += ["--max-model-len", str(self.max_model_len)]
        if self.dtype is not None:
            a += ["--dtype", self.dtype]
        if self.quantization is not None:
            a += ["--quantization", self.quantization]
        if self.kv_cache_dtype is not None:
            a += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.enable_prefix_caching is not None:
            a.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.max_num_seqs is not None:
            a += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_num_batched_tokens is not None:
            a += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.attention_backend is not None:
            a += ["--attention-backend", self.attention_backend]
        if self.cpu_offload_gb is not None:
            a += ["--cpu-offload-gb", _num(self.cpu_offload_gb)]
        if self.enable_sleep_mode:
            a.append("--enable-sleep-mode")
        a += ["--port", str(self.port)]
        return a + list(self.extra_args)


# ------------------------------------------------------------------ SDXL


class LoraSpec(_EngineModel):
    path: str = Field(min_length=1, pattern=r"^[^,]+$", description="LoRA weights file in the container (no commas).")
    weight: float = Field(default=1.0, ge=-10, le=10, description="Adapter scale; 1.0 is full strength.")


def _tiling(v: Any) -> Any:
    # YAML users write `vaeTiling: true`; the schema stays one string enum.
    if v is True:
        return "on"
    if v is False:
        return "off"
    return v


class SdxlSpec(_EngineModel):
    """The Stable Diffusion XL server of ``images/sdxl`` (diffusers, PyTorch SDPA)."""

    model_path: str = Field(min_length=1, description="SDXL checkpoint (.safetensors) or diffusers folder in the container (SDXL_MODEL).")
    dtype: SdxlDtype | None = Field(default=None, description="Pipeline dtype (SDXL_DTYPE); unset: the server's choice, float16 on CUDA.")
    vae_slicing: bool = Field(default=True, description="Decode the VAE one image at a time: less VRAM for batches (SDXL_VAE_SLICING).")
    vae_tiling: Annotated[Literal["auto", "on", "off"], BeforeValidator(_tiling)] = Field(
        default="auto",
        description="Decode the VAE in tiles (SDXL_VAE_TILING). auto: only above 1024 px in width or height; on; off.",
    )
    loras: list[LoraSpec] = Field(default_factory=list, description="LoRA adapters loaded at start (about 1 GB of VRAM each).")
    port: int = Field(default=7860, ge=1, le=65535, description="Port of the server and of GET /health (PORT).")

    def env(self) -> dict[str, str]:
        out = {
            "SDXL_MODEL": self.model_path,
            "SDXL_VAE_SLICING": "1" if self.vae_slicing else "0",
            "SDXL_VAE_TILING": {"auto": "auto", "on": "1", "off": "0"}[self.vae_tiling],
            "PORT": str(self.port),
        }
        if self.dtype is not None:
            out["SDXL_DTYPE"] = self.dtype
        if self.loras:
            # The weight is always written: the server splits at the last ':'.
            out["SDXL_LORAS"] = ",".join(f"{lo.path}:{_num(lo.weight)}" for lo in self.loras)
        return out


# ------------------------------------------------------------------ GPT-SoVITS


class SovitsSpec(_EngineModel):
    """GPT-SoVITS's ``api_v2.py`` server."""

    config: str | None = Field(
        default=None, min_length=1, description="tts_infer.yaml to load (-c); unset: api_v2.py's GPT_SoVITS/configs/tts_infer.yaml."
    )
    port: int = Field(default=9880, ge=1, le=65535, description="Port of the API and of GET /docs (-p).")
    bind: str = Field(
        default="0.0.0.0",
        description="Address to listen on (-a). api_v2.py's own default, 127.0.0.1, hides it from other containers and hosts.",
    )

    @field_validator("bind")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"bind {v!r} is not an IP address: use 0.0.0.0 (every interface) or 127.0.0.1") from None
        return v

    def flags(self) -> list[str]:
        a = ["-a", self.bind, "-p", str(self.port)]
        if self.config is not None:
            a += ["-c", self.config]
        return a

    @property
    def health_host(self) -> str:
        addr = ipaddress.ip_address(self.bind)
        return "127.0.0.1" if addr.is_unspecified else self.bind


# ------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class Rendering:
    """What an engine contributes to a model's container or process.

    ``program``: what the container's command starts with when the image's
    entrypoint does not start the server itself (api_v2.py); ``args``: the
    engine's flags; ``health_path``/``port``/``health_host``: the default
    health check (None: the engine knows none).
    """

    program: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str | None = None
    port: int | None = None
    health_host: str = "127.0.0.1"


CONTAINER = Rendering()


def render_vllm(v: VllmSpec, sleep: bool = False) -> Rendering:
    """``sleep``: the model's switchStrategy is sleep (renders the sleep mode
    whatever ``enableSleepMode`` says)."""
    if sleep and not v.enable_sleep_mode:
        v = v.model_copy(update={"enable_sleep_mode": True})
    env = {"VLLM_SERVER_DEV_MODE": "1"} if v.enable_sleep_mode else {}
    return Rendering(args=tuple(v.flags()), env=env, health_path="/health", port=v.port)


def render_sdxl(s: SdxlSpec, pin_for_sleep: bool = False) -> Rendering:
    """``pin_for_sleep``: level-1 sleeps are expected, so the server pins host
    buffers for its weights at load time (SDXL_SLEEP=1)."""
    env = s.env()
    if pin_for_sleep:
        env["SDXL_SLEEP"] = "1"
    return Rendering(env=env, health_path="/health", port=s.port)


def render_sovits(s: SovitsSpec) -> Rendering:
    return Rendering(program=SOVITS_PROGRAM, args=tuple(s.flags()), health_path="/docs", port=s.port, health_host=s.health_host)


# ------------------------------------------------------------------ sleep


@dataclass(frozen=True)
class SleepApi:
    """How to put one engine's server to sleep, wake it, and ask which it is.

    Paths are relative to the server's base URL. ``sleep_path`` is POSTed with
    ``level=N`` (and ``mode=wait`` when ``wait_mode``) appended to its query;
    ``wake_path`` is POSTed as is; ``state_path`` (GET) answers JSON with a
    boolean ``is_sleeping`` (None: the server cannot say).
    """

    sleep_path: str
    wake_path: str
    state_path: str | None
    wait_mode: bool = False

    def sleep_target(self, level: int) -> str:
        """The path and query of a sleep at ``level``."""
        query = f"level={level}" + ("&mode=wait" if self.wait_mode else "")
        return self.sleep_path + ("&" if "?" in self.sleep_path else "?") + query


VLLM_SLEEP_API = SleepApi("/sleep", "/wake_up", "/is_sleeping", wait_mode=True)
SDXL_SLEEP_API = SleepApi("/sleep", "/wake_up", "/is_sleeping")


def sleep_api(engine: str, path: str | None = None, wake_path: str | None = None, state_path: str | None = None) -> SleepApi | None:
    """The sleep API of ``engine``; for ``container`` the declared paths
    (None unless both ``path`` and ``wake_path`` are given). None: cannot sleep."""
    if engine == "vllm":
        return VLLM_SLEEP_API
    if engine == "sdxl":
        return SDXL_SLEEP_API
    if engine == "container" and path is not None and wake_path is not None:
        return SleepApi(path, wake_path, state_path)
    return None

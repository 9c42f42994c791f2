"""The torch side of the SDXL server: build or load the pipeline, generate, report VRAM.

Kept apart from ``server.py`` so the HTTP server can answer ``/health`` (503)
within milliseconds of starting while this module, torch and diffusers are
still being imported in the loader thread.

Attention is PyTorch's ``scaled_dot_product_attention`` through diffusers'
``AttnProcessor2_0`` on every attention layer, set explicitly and checked
after loading: never xformers (the users' rule, and vramctl's preflight
refuses an image that has it installed).

``SDXL_RANDOM_INIT`` builds a randomly initialised pipeline from configs in
this file, with no download and no weights on disk:

- ``tiny``: SDXL-shaped (two text encoders, text-time conditioning, a VAE that
  downsamples by 8) but a few hundred thousand parameters, for CPU tests;
- ``full``: the real SDXL base 1.0 sizes (UNet 2.6 B parameters, both CLIP
  text encoders, the 83 M VAE), for GPU benchmarks: same shapes, same kernels,
  same VRAM as the real model, only the numbers in the weights differ.

Sleep (``Engine.sleep`` / ``Engine.wake``, behind the server's ``POST /sleep``):
level 1 copies every weight into host buffers and frees the device's copy and
the allocator's cache; level 2 drops the weights and rebuilds the pipeline on
wake (from disk; a random pipeline from its seed). With ``SDXL_SLEEP=1`` the
host buffers are allocated and pinned once, at load: a pinned copy moves
14 GiB in 0.3 s, a pageable one takes 10 s, and pinning at sleep time costs
seconds the first time (DESIGN.md measured all three). Pinning registers one
exactly-sized buffer with ``cudaHostRegister`` (torch's pinned allocator would
round it up to a power of two); where that fails, torch's ``pin_memory``,
and where that fails too, pageable memory with a logged warning.

Both use a minimal byte-level CLIP vocabulary (every byte, alone and as an
end of word, and the two special tokens) written at start-up: a prompt
tokenises into one token a byte, and is still padded to 77 tokens like the
real tokenizer does.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

log = logging.getLogger("sdxl")


class _DropUpcastNotice(logging.Filter):
    """diffusers logs this twice an image when the SDXL VAE is upcast to fp32 for decoding (force_upcast)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropUpcastNotice())

# SDXL base 1.0's scheduler (EulerDiscreteScheduler, as shipped in its model_index).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# The real SDXL base 1.0 configs (unet/, vae/, text_encoder/, text_encoder_2/).
FULL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 + 1280 (text_encoder_2's projection)
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
FULL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # the stock SDXL VAE overflows in fp16: diffusers decodes it in fp32
}
FULL_TEXT_1: dict[str, Any] = {  # CLIP ViT-L/14
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
FULL_TEXT_2: dict[str, Any] = {  # OpenCLIP ViT-bigG/14
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# SDXL-shaped but tiny: the same block types and conditioning, a VAE that still
# downsamples by 8 (four blocks), so the server's size rules are the real ones.
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "cross_attention_dim": 64,  # text_encoder hidden 32 + text_encoder_2 hidden 32
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

RANDOM_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT, TINY_TEXT),
    "full": (FULL_UNET, FULL_VAE, FULL_TEXT_1, FULL_TEXT_2),
}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """SDXL_DTYPE: float16 (default on CUDA), bfloat16 or float32 (default on CPU: fp16 on CPU is slow and lossy)."""
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    table |= {"float32": torch.float32, "fp32": torch.float32}
    if not name:
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return table[name.strip().lower()]
    except KeyError:
        raise ValueError(f"SDXL_DTYPE must be one of float16, bfloat16, float32; got {name!r}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- a tokenizer with no download -------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for the bytes 0-255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


BOS_ID = 512
EOS_ID = 513


def write_byte_vocab(folder: Path) -> Path:
    """Write a minimal CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab |= {s + "</w>": 256 + i for i, s in enumerate(symbols)}
    vocab |= {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def byte_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="sdxl-vocab-") as tmp:
        return CLIPTokenizer.from_pretrained(str(write_byte_vocab(Path(tmp))), local_files_only=True)


# -- building and loading ----------------------------------------------------


class _Materialise:
    """Create parameters directly on ``device`` in ``dtype``: a 2.6 B-parameter UNet
    initialised on a GPU in fp16 takes a second, on a CPU in fp32 minutes and 10 GB."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._old_dtype = torch.get_default_dtype()

    def __enter__(self) -> None:
        self.device.__enter__()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self._old_dtype)
        self.device.__exit__(*exc)


def build_random_pipeline(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL pipeline of ``size`` ('tiny' or 'full'), on ``device``, with no download."""
    if size not in RANDOM_CONFIGS:
        raise ValueError(f"SDXL_RANDOM_INIT must be tiny or full, got {size!r}")
    unet_cfg, vae_cfg, text1, text2 = RANDOM_CONFIGS[size]
    torch.manual_seed(seed)
    common = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "layer_norm_eps": 1e-5}
    with _Materialise(device, dtype):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text1, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text2, **common))
    tokenizer = byte_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=byte_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    return pipe


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """Load SDXL_MODEL: a diffusers folder (model_index.json), one .safetensors/.ckpt file, or a hub id.

    A single file needs the diffusers configs and tokenizers beside it: SDXL_CONFIG
    names a local diffusers folder of SDXL base to take them from (only its small
    files are read), else they come from the Hugging Face cache (no download when
    HF_HUB_OFFLINE=1).
    """
    path = Path(model)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": None}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"SDXL_MODEL={model} is a folder without model_index.json (not a diffusers pipeline)")
        variant = "fp16" if dtype == torch.float16 and any(path.glob("unet/*.fp16.safetensors")) else None
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True, variant=variant, **kwargs)
    elif path.is_file():
        config = os.environ.get("SDXL_CONFIG") or None
        kwargs.pop("use_safetensors")
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=config, **kwargs)
    elif model.startswith(("/", ".")):
        raise FileNotFoundError(f"SDXL_MODEL={model} does not exist (is the models volume mounted?)")
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, **kwargs)
    return pipe.to(device)


def parse_loras(spec: str) -> list[tuple[str, float]]:
    """SDXL_LORAS='a.safetensors:0.8,b.safetensors' -> [('a.safetensors', 0.8), ('b.safetensors', 1.0)]."""
    out: list[tuple[str, float]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, sep, weight = item.rpartition(":")
        if sep and path:
            try:
                out.append((path, float(weight)))
                continue
            except ValueError:
                pass
        out.append((item, 1.0))
    return out


def use_sdpa(pipe: StableDiffusionXLPipeline) -> None:
    """PyTorch SDPA on every attention layer of the UNet and the VAE; refuse anything xformers."""
    for model in (pipe.unet, pipe.vae):
        model.set_attn_processor(AttnProcessor2_0())
        kinds = {type(p).__name__ for p in model.attn_processors.values()}
        if any("xformers" in k.lower() for k in kinds):
            raise RuntimeError(f"{type(model).__name__} still has xformers attention processors: {sorted(kinds)}")


def encode_png(image: Any, level: int) -> bytes:
    """PNG bytes of an RGB PIL image. Level 0 is written here, unfiltered and stored:
    about 5 ms for 1024x1024 where PIL takes 60-100 ms at any level (its per-row
    filter search), which would be 2-4 % of an H100's SDXL image. Levels 1-9 go
    through PIL, whose filters make photos far smaller."""
    if level > 0 or image.mode != "RGB":
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    width, height = image.size
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # each row: filter byte 0 (none), then RGB
    rows[:, 1:] = np.asarray(image, dtype=np.uint8).reshape(height, 3 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)) + chunk(b"IEND", b"")


class Asleep(RuntimeError):
    """A generate() while the weights are not on the device."""

    def __init__(self, level: int) -> None:
        super().__init__(f"the pipeline is asleep (level {level}): POST /wake_up first")
        self.level = level


@dataclass(frozen=True)
class Generated:
    png: bytes
    seed: int
    seconds: float  # the whole generate(): pipeline and PNG encoding
    pipeline_seconds: float
    encode_seconds: float
    peak_bytes: int  # torch.cuda.max_memory_allocated() during this image; 0 on the CPU


@dataclass
class Settings:
    """The server's model settings, from the environment (see server.py)."""

    model: str | None = None
    random_init: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    vae_slicing: bool = True
    vae_tiling: str = "auto"  # auto: only above 1024 px on a side; on; off
    loras: Sequence[tuple[str, float]] = ()
    png_compress_level: int = 0
    sleep_pinned: bool = False  # SDXL_SLEEP=1: host buffers for a level-1 sleep, pinned at load


# The pipeline parts that hold weights, in a fixed order.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_ALIGN = 256  # bytes: every view into the host buffer starts on a boundary any dtype accepts


def weight_tensors(pipe: StableDiffusionXLPipeline) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer of the pipeline's parts, each tensor once."""
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for comp in COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
            for name, t in named:
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append((f"{comp}.{kind}.{name}", t))
    return out


class HostBuffers:
    """One host buffer, cut into a view per weight tensor: where a sleeping pipeline's weights live.

    ``how`` says what the memory is: ``registered`` (pinned with
    cudaHostRegister, exactly its size), ``pinned`` (torch's pinned allocator)
    or ``pageable`` (copies are slow; logged once as a warning).
    """

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], pin: bool) -> None:
        layout: dict[str, tuple[int, torch.Size, torch.dtype]] = {}
        offset = 0
        for name, t in tensors:
            layout[name] = (offset, t.shape, t.dtype)
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.flat, self.how = _host_memory(offset, pin)
        self.views = {
            name: self.flat[off : off + _nbytes(shape, dtype)].view(dtype).view(shape) for name, (off, shape, dtype) in layout.items()
        }


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _host_memory(nbytes: int, pin: bool) -> tuple[torch.Tensor, str]:
    if pin and torch.cuda.is_available():
        flat = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        try:
            cudart = torch.cuda.cudart()
            if cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0) == cudart.cudaError.success:
                return flat, "registered"
        except Exception as exc:  # an old torch without cudart bindings, a driver that refuses
            log.info("cudaHostRegister failed (%s); trying torch's pinned allocator", exc)
        try:
            return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True), "pinned"
        except Exception as exc:  # WSL2 and locked-memory limits refuse large pinned buffers
            log.warning("cannot pin %d MiB of host memory for sleeping (%s): sleeps copy into pageable memory (slow)", nbytes >> 20, exc)
    elif pin:
        log.warning("no CUDA here: SDXL_SLEEP host buffers are pageable memory")
    return torch.empty(max(nbytes, 1), dtype=torch.uint8), "pageable"


def build_pipe(settings: Settings) -> StableDiffusionXLPipeline:
    """The pipeline as ``settings`` say: built or loaded, SDPA, slicing, LoRAs."""
    if settings.random_init:
        pipe = build_random_pipeline(settings.random_init, settings.device, settings.dtype)
    elif settings.model:
        pipe = load_pipeline(settings.model, settings.device, settings.dtype)
    else:
        raise ValueError("set SDXL_MODEL (a diffusers folder or a .safetensors file) or SDXL_RANDOM_INIT=tiny|full")
    use_sdpa(pipe)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.loras:
        names = []
        for i, (path, weight) in enumerate(settings.loras):
            name = f"lora{i}"
            pipe.load_lora_weights(path, adapter_name=name)
            names.append(name)
            log.info("LoRA %s loaded from %s (weight %s)", name, path, weight)
        pipe.set_adapters(names, adapter_weights=[w for _, w in settings.loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Engine:
    """One loaded pipeline; ``generate``, ``sleep`` and ``wake`` run one at a time (a lock)."""

    def __init__(self, pipe: StableDiffusionXLPipeline, settings: Settings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.device = settings.device
        self._lock = threading.Lock()
        self.asleep: int = 0  # the level slept at; 0: awake
        self.host: HostBuffers | None = None
        if settings.sleep_pinned:
            started = time.monotonic()
            self.host = HostBuffers(weight_tensors(pipe), pin=True)
            log.info(
                "sleep: %d MiB of %s host memory for the weights in %.2f s",
                self.host.nbytes >> 20,
                self.host.how,
                time.monotonic() - started,
            )

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        started = time.monotonic()
        pipe = build_pipe(settings)
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
        log.info("pipeline on %s (%s) in %.1f s", settings.device, str(settings.dtype).removeprefix("torch."), time.monotonic() - started)
        return cls(pipe, settings)

    def sleep(self, level: int) -> dict[str, Any]:
        """Free the device: level 1 keeps the weights in host memory, level 2 drops them.

        Waits for an image in progress (the lock). Sleeping again while
        asleep does nothing. Returns what was done, for the HTTP answer.
        """
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        with self._lock:
            if self.asleep:
                return {
                    "level": self.asleep,
                    "seconds": 0.0,
                    "host_bytes": self.host.nbytes if self.host else 0,
                    "host_memory": self._how(),
                }
            started = time.perf_counter()
            tensors = weight_tensors(self.pipe)
            if level == 1:
                if self.host is None:
                    log.warning("sleep level 1 without SDXL_SLEEP=1: the host buffers are allocated now, pageable (slow)")
                    self.host = HostBuffers(tensors, pin=False)
                for name, t in tensors:
                    self.host.views[name].copy_(t, non_blocking=True)
                self._sync()
            for _, t in tensors:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self._free_cache()
            self.asleep = level
            seconds = time.perf_counter() - started
            log.info("asleep (level %d) in %.3f s", level, seconds)
            return {
                "level": level,
                "seconds": seconds,
                "host_bytes": self.host.nbytes if self.host and level == 1 else 0,
                "host_memory": self._how(),
            }

    def wake(self) -> dict[str, Any]:
        """Bring the weights back: a copy from host memory (level 1) or a rebuild (level 2)."""
        with self._lock:
            if not self.asleep:
                return {"level": 0, "seconds": 0.0}
            level, started = self.asleep, time.perf_counter()
            if level == 1:
                assert self.host is not None
                for name, t in weight_tensors(self.pipe):
                    src = self.host.views[name]
                    t.data = torch.empty(src.shape, dtype=src.dtype, device=self.device).copy_(src, non_blocking=True)
            else:
                old = self.pipe
                self.pipe = build_pipe(self.settings)
                del old
                self._free_cache(collect=True)
            self._sync()
            self.asleep = 0
            seconds = time.perf_counter() - started
            log.info("awake (from level %d) in %.3f s", level, seconds)
            return {"level": level, "seconds": seconds}

    def _how(self) -> str:
        return self.host.how if self.host is not None else "none"

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _free_cache(self, collect: bool = False) -> None:
        # gc.collect() costs 0.1-0.3 s with torch and diffusers loaded: only
        # where a dropped pipeline may sit in reference cycles (level 2).
        if collect:
            gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            # cuBLAS keeps its workspaces allocated (so empty_cache cannot return them) until told.
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    def wants_tiling(self, width: int, height: int) -> bool:
        mode = self.settings.vae_tiling
        return mode == "on" or (mode == "auto" and max(width, height) > 1024)

    def generate(
        self,
        prompt: str,
        negative_prompt: str,
        steps: int,
        width: int,
        height: int,
        seed: int,
        guidance: float,
    ) -> Generated:
        """One PNG. The same arguments give the same bytes on the same device and software."""
        with self._lock:
            if self.asleep:
                raise Asleep(self.asleep)
            started = time.perf_counter()
            cuda = self.device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            vae = self.pipe.vae
            if self.wants_tiling(width, height):
                vae.enable_tiling()
            else:
                vae.disable_tiling()
            # A CPU generator: the same seed gives the same noise on any device.
            generator = torch.Generator("cpu").manual_seed(seed)
            with torch.inference_mode():
                image = self.pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    width=width,
                    height=height,
                    guidance_scale=guidance,
                    generator=generator,
                    output_type="pil",
                ).images[0]
            encode_started = time.perf_counter()
            png = encode_png(image, self.settings.png_compress_level)
            done = time.perf_counter()
            return Generated(
                png=png,
                seed=seed,
                seconds=done - started,
                pipeline_seconds=encode_started - started,
                encode_seconds=done - encode_started,
                peak_bytes=int(torch.cuda.max_memory_allocated()) if cuda else 0,
            )

    def vram(self) -> dict[str, Any]:
        if not self.device.startswith("cuda"):
            return {"device": self.device, "allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0, "total_bytes": 0}
        free, total = torch.cuda.mem_get_info()
        return {
            "device": self.device,
            "name": torch.cuda.get_device_name(),
            "allocated_bytes": int(torch.cuda.memory_allocated()),
            "reserved_bytes": int(torch.cuda.memory_reserved()),
            "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "free_bytes": int(free),
            "total_bytes": int(total),
        }

    def describe(self) -> dict[str, Any]:
        processors = sorted({type(p).__name__ for p in self.pipe.unet.attn_processors.values()})
        return {
            "device": self.device,
            "dtype": str(self.settings.dtype).removeprefix("torch."),
            "attention": processors,
            "vae_slicing": self.settings.vae_slicing,
            "vae_tiling": self.settings.vae_tiling,
            "loras": [{"path": p, "weight": w} for p, w in self.settings.loras],
        }

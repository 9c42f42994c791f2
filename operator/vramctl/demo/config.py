"""The embedded default: a demo stack of stand-in model servers.

Three models on one (simulated unless NVML answers) 16 GB GPU, shaped like the
users' RTX 5080 setup: an LLM and SDXL (heavy, never together) and a voice
model (light, fits beside either). Each model can run as a container of the
stand-in image or as a local process of ``python -m vramctl.demo.standin``.
"""

from __future__ import annotations

import sys
from typing import Any

from vramctl.spec.models import Config, parse_config

STANDIN_IMAGE = "vramctl/standin:dev"


def _model(cls: str, port: int, vram: int, load: float, stop: float) -> dict[str, Any]:
    return {
        "class": cls,
        "image": STANDIN_IMAGE,
        "command": [sys.executable, "-m", "vramctl.demo.standin"],
        "env": {
            "STANDIN_PORT": str(port),
            "STANDIN_LOAD_SECONDS": str(load),
            "STANDIN_STOP_SECONDS": str(stop),
        },
        "health": {"path": "/health", "port": port},
        "stop": {"signal": "SIGTERM", "gracePeriodSeconds": 10},
        "startTimeoutSeconds": 60,
        "vramMiB": vram,
    }


def demo_document() -> dict[str, Any]:
    return {
        "runtime": "auto",
        "gpuProbe": {"kind": "auto", "totalMiB": 16303, "releaseDelaySeconds": 0.3},
        "gpus": [
            {
                "name": "demo-gpu0",
                "gpu": 0,
                "activeModel": "llm",
                "companions": ["tts"],
                # No `env:` needed for the SDPA variables: vramctl injects
                # XFORMERS_DISABLED, VLLM_USE_TRITON_FLASH_ATTN and
                # PYTORCH_CUDA_ALLOC_CONF into every model (envPolicy.sdpaDefaults).
                "models": {
                    "llm": _model("heavy", 18000, 12000, 3.0, 1.0),
                    "sdxl": _model("heavy", 17860, 11000, 2.0, 0.5),
                    "tts": _model("light", 19880, 3500, 1.0, 0.2),
                },
            }
        ],
    }


def demo_config() -> Config:
    return parse_config(demo_document(), "embedded demo config")

"""Helpers for the image tests: load images/ modules by path, free ports.

The modules under images/ are not part of the vramctl package (the supervisor
never imports torch): they are loaded here by file path, under names of their
own, and images/sdxl is put on sys.path so server.py's lazy
``import sdxl_pipeline`` finds its sibling, as it does in the image.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
SDXL_DIR = IMAGES / "sdxl"


def load_module(name: str, path: Path) -> ModuleType:
    """Import ``path`` as module ``name`` (once: later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sdxl_on_path() -> None:
    if str(SDXL_DIR) not in sys.path:
        sys.path.insert(0, str(SDXL_DIR))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

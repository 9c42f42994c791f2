#!/usr/bin/env python3
"""vramctl's SDXL server: one StableDiffusionXLPipeline behind three HTTP paths.

    GET  /health    503 {"status": "loading"} until the weights are on the device, then
                    200 {"status": "ready", ...}; 500 {"status": "failed"} if loading failed
                    (the process then exits 1, so the supervisor sees a crash, not a hang).
    POST /generate  JSON {prompt, negative_prompt, steps, width, height, seed, guidance}
                    -> 200 image/png, with X-Seed, X-Generation-Seconds (of which
                    X-Pipeline-Seconds and X-Encode-Seconds) and X-Peak-VRAM-Bytes;
                    400 {"error", "field"} naming the bad field; 503 while loading.
    GET  /vram      torch.cuda allocated / reserved / peak bytes (zeros on the CPU).
    POST /v1/images/generations  OpenAI's shape: JSON {prompt, n (1-4), size "WxH",
                    response_format b64_json, model (ignored)} plus this server's
                    negative_prompt, steps, seed, guidance -> 200 {"created", "data":
                    [{"b64_json", "revised_prompt"}]}; errors as {"error": {"message",
                    "type", "param", "code"}} with param naming the field.
    POST /sleep?level=1|2  free the GPU: level 1 moves the weights to host memory (pinned
                    at load with SDXL_SLEEP=1), level 2 drops them (wake rebuilds the
                    pipeline from disk); waits for an image in progress; 200 {"is_sleeping":
                    true, "level", "seconds", "host_bytes", "host_memory"}. (vLLM's mode=
                    is accepted and ignored: this server always waits.)
    POST /wake_up   weights back on the GPU; 200 {"is_sleeping": false, "level", "seconds"}.
    GET  /is_sleeping  {"is_sleeping": bool, "state": awake|sleeping|asleep|waking, "level",
                    "host_bytes", "host_memory": registered|pinned|pageable|none}.
                    While not awake, /health answers 200 {"status": <state>} and image
                    requests 503 with Retry-After (never a wait for a wake).

The HTTP side is the standard library only and serves from background threads
at once, while the main thread imports torch and diffusers and loads the
weights: /health answers 503 within milliseconds of the start (vramctl and
docker tell "loading" from "dead"). The main thread then makes the images,
one at a time (the GPU is the bottleneck; a second request waits for the
first), while /health and /vram stay answerable during a generation.

Environment:
    SDXL_MODEL          a diffusers folder, a single .safetensors file (configs from
                        SDXL_CONFIG or the HF cache) or a hub id
    SDXL_RANDOM_INIT    tiny | full: a randomly initialised SDXL-shaped pipeline, no
                        weights and no download (tests, GPU benchmarks)
    SDXL_DEVICE         cuda (default when available) or cpu
    SDXL_DTYPE          float16 (default on CUDA) | bfloat16 | float32 (default on CPU)
    SDXL_VAE_SLICING    1 (default) or 0
    SDXL_VAE_TILING     auto (default: only above 1024 px on a side) | 1 | 0
    SDXL_LORAS          path[:weight],path[:weight]  (weight defaults to 1.0)
    SDXL_SLEEP          1: allocate and pin host buffers for the weights at load, so a
                        level-1 sleep is a fast copy (0 default: a level-1 sleep
                        allocates pageable buffers then, slowly, and warns)
    SDXL_PNG_COMPRESS   zlib level 0-9 for the PNG (default 0: stored, about 5 ms and 3 MB for
                        1024x1024; 6 makes ~1.5 MB photos for 0.1-0.2 s of CPU)
    HOST, PORT          where to listen (default 127.0.0.1:7860)
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger("sdxl")

MAX_BODY_BYTES = 64 * 1024
MIN_SIDE, MAX_SIDE = 64, 2048
MIN_STEPS, MAX_STEPS = 1, 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4000


# -- requests ---------------------------------------------------------------


class BadRequest(ValueError):
    """A client error that names the offending field (None: the body as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    width: int = 1024
    height: int = 1024
    seed: int | None = None
    guidance: float = 5.0


FIELDS = ("prompt", "negative_prompt", "steps", "width", "height", "seed", "guidance")


def parse_generate(body: bytes) -> GenerateRequest:
    """Validate a /generate body; raise BadRequest naming the first bad field."""
    try:
        doc = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(None, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(None, 'body must be a JSON object like {"prompt": "a cat"}')
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")

    prompt = doc.get("prompt")
    if prompt is None:
        raise BadRequest("prompt", "prompt is required")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt", "prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest("prompt", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    negative = doc.get("negative_prompt", "")
    if negative is None:
        negative = ""
    if not isinstance(negative, str):
        raise BadRequest("negative_prompt", "negative_prompt must be a string")
    if len(negative) > MAX_PROMPT_CHARS:
        raise BadRequest("negative_prompt", f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")

    steps = _int(doc, "steps", GenerateRequest.steps, MIN_STEPS, MAX_STEPS)
    width = _side(doc, "width")
    height = _side(doc, "height")
    seed = None if doc.get("seed") is None else _int(doc, "seed", 0, 0, MAX_SEED)
    guidance = doc.get("guidance", GenerateRequest.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float):
        raise BadRequest("guidance", "guidance must be a number")
    if not 0.0 <= float(guidance) <= MAX_GUIDANCE:
        raise BadRequest("guidance", f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance}")
    return GenerateRequest(prompt, negative, steps, width, height, seed, float(guidance))


def _int(doc: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"{name} must be an integer, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise BadRequest(name, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _side(doc: Mapping[str, Any], name: str) -> int:
    value = _int(doc, name, 1024, MIN_SIDE, MAX_SIDE)
    if value % 8:
        raise BadRequest(name, f"{name} must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {value}")
    return value


IMAGES_PATH = "/v1/images/generations"
OPENAI_IGNORED = ("model", "quality", "style", "user")  # accepted, meaningless here
MAX_IMAGES = 4


def parse_images(body: bytes) -> tuple[GenerateRequest, int]:
    """Validate an OpenAI images request; the request for the first image and
    how many to make (each next one with the next seed). BadRequest names the
    OpenAI field (size, not width)."""
    try:
        doc = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(None, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(None, 'body must be a JSON object like {"prompt": "a cat"}')
    known = ("prompt", "n", "size", "response_format", *OPENAI_IGNORED, "negative_prompt", "steps", "seed", "guidance")
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field {unknown[0]!r}; known fields: {', '.join(known)}")
    fmt = doc.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise BadRequest("response_format", f"response_format must be b64_json (this server keeps no files to link to), got {fmt!r}")
    n = _int(doc, "n", 1, 1, MAX_IMAGES)
    size = doc.get("size") or "1024x1024"
    parts = size.split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise BadRequest("size", f'size must be "WIDTHxHEIGHT", e.g. "1024x1024", got {json.dumps(size)}')
    sub = {k: doc[k] for k in ("prompt", "negative_prompt", "steps", "seed", "guidance") if k in doc}
    sub["width"], sub["height"] = int(parts[0]), int(parts[1])
    try:
        return parse_generate(json.dumps(sub).encode()), n
    except BadRequest as exc:
        if exc.field in ("width", "height"):
            raise BadRequest("size", f"size: {exc.message}") from None
        raise


# -- configuration ----------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860


def server_config(env: Mapping[str, str]) -> ServerConfig:
    port_s = env.get("PORT", "7860")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"PORT must be a number, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"PORT must be 0-65535, got {port}")
    return ServerConfig(host=env.get("HOST", "127.0.0.1") or "127.0.0.1", port=port)


def _flag(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, default).strip().lower() or default
    aliases = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}
    value = aliases.get(value, value)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {env[name]!r}")
    return value


def model_settings(env: Mapping[str, str]) -> Any:
    """The pipeline settings from the environment (imports torch: call it in the loader thread)."""
    import sdxl_pipeline as sp

    device = env.get("SDXL_DEVICE") or sp.default_device()
    random_init = env.get("SDXL_RANDOM_INIT") or None
    if random_init and random_init not in sp.RANDOM_CONFIGS:
        raise ValueError(f"SDXL_RANDOM_INIT must be tiny or full, got {random_init!r}")
    compress = env.get("SDXL_PNG_COMPRESS", "0")
    if compress not in [str(i) for i in range(10)]:
        raise ValueError(f"SDXL_PNG_COMPRESS must be 0-9, got {compress!r}")
    tiling = _flag(env, "SDXL_VAE_TILING", "auto", ("auto", "1", "0"))
    return sp.Settings(
        model=env.get("SDXL_MODEL") or None,
        random_init=random_init,
        device=device,
        dtype=sp.parse_dtype(env.get("SDXL_DTYPE"), device),
        vae_slicing=_flag(env, "SDXL_VAE_SLICING", "1", ("1", "0")) == "1",
        vae_tiling={"1": "on", "0": "off"}.get(tiling, tiling),
        loras=sp.parse_loras(env.get("SDXL_LORAS", "")),
        png_compress_level=int(compress),
        sleep_pinned=_flag(env, "SDXL_SLEEP", "0", ("1", "0")) == "1",
    )


# -- the application --------------------------------------------------------


class GeneratedLike(Protocol):
    png: bytes
    seed: int
    seconds: float  # the whole generate(): pipeline and PNG encoding
    pipeline_seconds: float
    encode_seconds: float
    peak_bytes: int


class EngineLike(Protocol):
    def generate(
        self, prompt: str, negative_prompt: str, steps: int, width: int, height: int, seed: int, guidance: float
    ) -> GeneratedLike: ...

    def vram(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def sleep(self, level: int) -> dict[str, Any]: ...

    def wake(self) -> dict[str, Any]: ...


class NotAwake(RuntimeError):
    """An image asked for while the pipeline sleeps, goes to sleep or wakes."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the pipeline is {state}: POST /wake_up first (vramctl wakes it when this model is wanted)")
        self.state = state


def check_model_source(env: Mapping[str, str]) -> None:
    """Fail in milliseconds, before torch is imported, when there is nothing to load."""
    model, random_init = env.get("SDXL_MODEL"), env.get("SDXL_RANDOM_INIT")
    if random_init:
        return
    if not model:
        raise ValueError("set SDXL_MODEL (a diffusers folder or a .safetensors file) or SDXL_RANDOM_INIT=tiny|full")
    if model.startswith(("/", ".")) and not os.path.exists(model):
        raise FileNotFoundError(f"SDXL_MODEL={model} does not exist (is the models volume mounted?)")


def load_engine(env: Mapping[str, str]) -> EngineLike:
    check_model_source(env)
    import sdxl_pipeline as sp

    engine: EngineLike = sp.Engine.load(model_settings(env))
    return engine


class App:
    """Loading state, the engine, and the one thread that owns the GPU.

    ``run()`` loads the pipeline and then makes every image, one at a time,
    from a queue: torch sees a single long-lived thread (the main thread in
    ``main()``; "sdxl-gpu" after ``start()``), and /health and /vram never wait
    behind an image. The HTTP handlers only call methods here.
    """

    def __init__(self, load: Callable[[], EngineLike]) -> None:
        self._load = load
        self.engine: EngineLike | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.load_seconds: float | None = None
        self.loaded = threading.Event()  # set when loading ends, either way
        self.last: GeneratedLike | None = None
        # awake | sleeping | asleep | waking; changed only on the GPU thread, between jobs.
        self.sleep_state = "awake"
        self.sleep_level = 0
        self._jobs: queue.Queue[tuple[Future[Any], Callable[[], Any]] | None] = queue.Queue()

    def load(self) -> None:
        try:
            self.engine = self._load()
            self.load_seconds = time.monotonic() - self.started
            log.info("ready in %.1f s", self.load_seconds)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("loading failed: %s\n%s", self.error, traceback.format_exc())
        finally:
            self.loaded.set()

    def run(self) -> None:
        """The GPU thread's body: load, then serve the queue until stop()."""
        self.load()
        if self.engine is None:
            return
        while True:
            try:
                item = self._jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except Exception as exc:  # OOM and the like: the caller reports it; keep serving
                future.set_exception(exc)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sdxl-gpu", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._jobs.put(None)

    def _submit(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the GPU thread, after what is queued before it; its result or exception."""
        future: Future[Any] = Future()
        self._jobs.put((future, job))
        return future.result()

    def generate(self, req: GenerateRequest, seed: int) -> GeneratedLike:
        """Queue one image for the GPU thread and wait for it; NotAwake when the
        pipeline went to sleep before its turn (checked on the GPU thread, so an
        image never runs on dropped weights)."""

        def job() -> GeneratedLike:
            if self.sleep_state != "awake":
                raise NotAwake(self.sleep_state)
            assert self.engine is not None  # nothing is queued before loading succeeded
            result = self.engine.generate(req.prompt, req.negative_prompt, req.steps, req.width, req.height, seed, req.guidance)
            self.last = result
            return result

        result: GeneratedLike = self._submit(job)
        return result

    def sleep(self, level: int) -> dict[str, Any]:
        """Put the pipeline to sleep after the images queued before; idempotent."""

        def job() -> dict[str, Any]:
            assert self.engine is not None
            if self.sleep_state == "asleep":
                return {"level": self.sleep_level, "seconds": 0.0}
            self.sleep_state = "sleeping"
            try:
                doc = self.engine.sleep(level)
            except BaseException:
                self.sleep_state = "asleep" if getattr(self.engine, "asleep", 0) else "awake"
                raise
            self.sleep_state, self.sleep_level = "asleep", level
            return doc

        doc: dict[str, Any] = self._submit(job)
        return doc

    def wake(self) -> dict[str, Any]:
        """Bring the weights back; idempotent."""

        def job() -> dict[str, Any]:
            assert self.engine is not None
            if self.sleep_state == "awake":
                return {"level": 0, "seconds": 0.0}
            self.sleep_state = "waking"
            try:
                doc = self.engine.wake()
            except BaseException:
                self.sleep_state = "asleep" if getattr(self.engine, "asleep", 1) else "awake"
                raise
            self.sleep_state, self.sleep_level = "awake", 0
            return doc

        doc: dict[str, Any] = self._submit(job)
        return doc

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.engine is not None and self.sleep_state != "awake":
            return 200, {"status": self.sleep_state, "level": self.sleep_level}
        if self.engine is not None:
            return 200, {"status": "ready", "load_seconds": round(self.load_seconds or 0.0, 3), **self.engine.describe()}
        if self.error is not None:
            return 500, {"status": "failed", "error": self.error}
        return 503, {"status": "loading", "seconds": round(time.monotonic() - self.started, 3)}

    def vram(self) -> dict[str, Any]:
        if self.engine is None:
            return {"status": "loading", "allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}
        doc: dict[str, Any] = {"status": "ready", **self.engine.vram()}
        if self.last is not None:
            doc["last_generate"] = {
                "peak_bytes": self.last.peak_bytes,
                "seconds": round(self.last.seconds, 4),
                "pipeline_seconds": round(self.last.pipeline_seconds, 4),
                "encode_seconds": round(self.last.encode_seconds, 4),
            }
        return doc


class Handler(BaseHTTPRequestHandler):
    server_version = "vramctl-sdxl/1"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode() + b"\n", "application/json", headers)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            status, doc = self.app.health()
            self._json(status, doc, {"Retry-After": "1"} if status == 503 else None)
        elif path == "/vram":
            self._json(200, self.app.vram())
        elif path == "/is_sleeping":
            state = self.app.sleep_state
            host = getattr(self.app.engine, "host", None)  # the sleep buffers, when allocated
            doc = {"is_sleeping": state == "asleep", "state": state, "level": self.app.sleep_level}
            doc |= {"host_bytes": getattr(host, "nbytes", 0), "host_memory": getattr(host, "how", "none")}
            self._json(200, doc)
        else:
            self._json(404, {"error": f"no such path {path}; try GET /health, GET /vram, POST /generate"})

    do_HEAD = do_GET

    def _not_awake(self, openai: bool, state: str | None = None) -> bool:
        """Answer 503 with Retry-After when the pipeline is not awake, or was
        ``state`` when the request's turn came (True: answered)."""
        state = state or self.app.sleep_state
        if state == "awake":
            return False
        message = str(NotAwake(state))
        doc: dict[str, Any] = (
            {"error": {"message": message, "type": "server_error", "param": None, "code": "model_asleep"}}
            if openai
            else {"error": message, "status": state}
        )
        self._json(503, doc, {"Retry-After": "1"})
        return True

    def _sleep_or_wake(self, sleep: bool) -> None:
        self._drain()
        query = urllib.parse.parse_qs(self.path.partition("?")[2])
        level_s = query.get("level", ["1"])[0]
        if sleep and level_s not in ("1", "2"):
            self._json(400, {"error": f"level must be 1 or 2, got {level_s!r}", "field": "level"})
            return
        if self.app.engine is None:
            status, doc = self.app.health()
            self._json(503 if status == 503 else 500, doc, {"Retry-After": "1"})
            return
        try:
            doc = self.app.sleep(int(level_s)) if sleep else self.app.wake()
        except Exception as exc:
            log.error("%s failed: %s\n%s", "sleep" if sleep else "wake", exc, "".join(traceback.format_exception(exc)))
            self._json(500, {"error": f"{type(exc).__name__}: {exc}", "state": self.app.sleep_state})
            return
        self._json(200, {"is_sleeping": self.app.sleep_state == "asleep", **doc})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/sleep", "/wake_up"):
            self._sleep_or_wake(path == "/sleep")
            return
        if path == IMAGES_PATH:
            self._images()
            return
        if path != "/generate":
            self._drain()
            self._json(404, {"error": f"no such path {path}; try POST /generate or POST {IMAGES_PATH}"})
            return
        length_s = self.headers.get("Content-Length")
        try:
            length = int(length_s or "0")
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._json(413 if length > 0 else 400, {"error": f"Content-Length must be 0-{MAX_BODY_BYTES}, got {length_s}", "field": None})
            return
        body = self.rfile.read(length)
        try:
            req = parse_generate(body)
        except BadRequest as exc:
            self._json(400, {"error": exc.message, "field": exc.field})
            return
        if self.app.engine is None:
            status, doc = self.app.health()
            self._json(503 if status == 503 else 500, doc, {"Retry-After": "1"})
            return
        if self._not_awake(openai=False):
            return
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        try:
            out = self.app.generate(req, seed)
        except NotAwake as exc:
            self._not_awake(openai=False, state=exc.state)
            return
        except Exception as exc:  # OOM and the like: report it, keep serving
            log.error("generate failed: %s\n%s", exc, "".join(traceback.format_exception(exc)))
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._send(
            200,
            out.png,
            "image/png",
            {
                "X-Seed": str(seed),
                "X-Generation-Seconds": f"{out.seconds:.4f}",
                "X-Pipeline-Seconds": f"{out.pipeline_seconds:.4f}",
                "X-Encode-Seconds": f"{out.encode_seconds:.4f}",
                "X-Peak-VRAM-Bytes": str(out.peak_bytes),
            },
        )

    def _images(self) -> None:
        """POST /v1/images/generations: the same pipeline, OpenAI's request and answer shapes."""

        def error(
            status: int, message: str, param: str | None, type_: str = "invalid_request_error", headers: Mapping[str, str] | None = None
        ) -> None:
            self._json(status, {"error": {"message": message, "type": type_, "param": param, "code": None}}, headers)

        length_s = self.headers.get("Content-Length")
        try:
            length = int(length_s or "0")
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            error(413 if length > 0 else 400, f"Content-Length must be 0-{MAX_BODY_BYTES}, got {length_s}", None)
            return
        try:
            req, n = parse_images(self.rfile.read(length))
        except BadRequest as exc:
            error(400, exc.message, exc.field)
            return
        if self.app.engine is None:
            status, doc = self.app.health()
            error(503 if status == 503 else 500, f"the pipeline is {doc['status']}", None, "server_error", {"Retry-After": "1"})
            return
        if self._not_awake(openai=True):
            return
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        data = []
        t0 = time.monotonic()
        try:
            for i in range(n):
                out = self.app.generate(req, seed + i)
                data.append({"b64_json": base64.b64encode(out.png).decode(), "revised_prompt": req.prompt})
        except NotAwake as exc:
            self._not_awake(openai=True, state=exc.state)
            return
        except Exception as exc:  # OOM and the like: report it, keep serving
            log.error("generate failed: %s\n%s", exc, "".join(traceback.format_exception(exc)))
            error(500, f"{type(exc).__name__}: {exc}", None, "server_error")
            return
        self._json(
            200, {"created": int(time.time()), "data": data}, {"X-Seed": str(seed), "X-Generation-Seconds": f"{time.monotonic() - t0:.4f}"}
        )

    def _drain(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = 0
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)


def make_server(app: App, config: ServerConfig) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    httpd = ThreadingHTTPServer((config.host, config.port), handler)
    httpd.daemon_threads = True
    return httpd


def main(env: Mapping[str, str] | None = None) -> int:
    """Serve HTTP from background threads; load and generate on the main thread.

    The main thread is torch's: on an H100 the same pipeline ran about 5 %
    slower when called from a second thread (median of 8 interleaved pairs).
    SIGTERM and SIGINT end the process at once, mid-image too: a supervisor
    that stops this server wants the GPU memory back, and the driver frees it
    when the process is gone.
    """
    env = os.environ if env is None else env
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s sdxl %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        config = server_config(env)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    app = App(lambda: load_engine(env))
    httpd = make_server(app, config)
    host, port = httpd.server_address[:2]
    log.info("listening on http://%s:%s (loading the pipeline)", host, port)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: exiting", signal.Signals(signum).name)
        logging.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="sdxl-http", daemon=True).start()
    app.run()  # returns only when loading failed: serving the queue never ends
    # Give a probe a moment to read the 500 with the reason, then die loudly.
    time.sleep(1.0)
    logging.shutdown()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())

"""images/sdxl: the SDXL server on the CPU, with the tiny randomly initialised
SDXL-shaped pipeline (SDXL_RANDOM_INIT=tiny: no weights, no download).

Three layers: the request rules (pure), the HTTP app with a gated fake engine
(503 until loaded, deterministically), and the real server as a subprocess
(PNG of the asked size, seeds that reproduce, clear 400s, SIGTERM), plus the
engine in-process for LoRAs, tiling and the PNG writer.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.sdxl import FakeEngine, RealServer, Reply, pixels, png_size, request, server, start_server

# -- request rules (pure) ---------------------------------------------------


def test_defaults() -> None:
    req = server.parse_generate(b'{"prompt": "a cat"}')
    assert req == server.GenerateRequest(prompt="a cat", negative_prompt="", steps=30, width=1024, height=1024, seed=None, guidance=5.0)
    req = server.parse_generate(
        b'{"prompt": "a", "negative_prompt": null, "steps": 4.0, "width": 64, "height": 2048, "seed": 0, "guidance": 0}'
    )
    assert (req.negative_prompt, req.steps, req.width, req.height, req.seed, req.guidance) == ("", 4, 64, 2048, 0, 0.0)


BAD_BODIES = [
    pytest.param({"steps": 2}, "prompt", "prompt is required", id="missing-prompt"),
    pytest.param({"prompt": "  "}, "prompt", "non-empty string", id="blank-prompt"),
    pytest.param({"prompt": 3}, "prompt", "non-empty string", id="prompt-not-string"),
    pytest.param({"prompt": "x" * 4001}, "prompt", "longer than 4000", id="prompt-too-long"),
    pytest.param({"prompt": "a", "negative_prompt": ["no"]}, "negative_prompt", "must be a string", id="negative-not-string"),
    pytest.param({"prompt": "a", "width": 65}, "width", "width must be a multiple of 8", id="width-not-multiple-of-8"),
    pytest.param({"prompt": "a", "height": 1020}, "height", "height must be a multiple of 8", id="height-not-multiple-of-8"),
    pytest.param({"prompt": "a", "width": 32}, "width", "between 64 and 2048", id="width-too-small"),
    pytest.param({"prompt": "a", "height": 4096}, "height", "between 64 and 2048", id="height-too-big"),
    pytest.param({"prompt": "a", "width": "512"}, "width", "must be an integer", id="width-string"),
    pytest.param({"prompt": "a", "steps": 0}, "steps", "between 1 and 150", id="steps-zero"),
    pytest.param({"prompt": "a", "steps": 151}, "steps", "between 1 and 150", id="steps-too-many"),
    pytest.param({"prompt": "a", "steps": 2.5}, "steps", "must be an integer", id="steps-fraction"),
    pytest.param({"prompt": "a", "steps": True}, "steps", "must be an integer", id="steps-bool"),
    pytest.param({"prompt": "a", "seed": -1}, "seed", "between 0 and", id="seed-negative"),
    pytest.param({"prompt": "a", "seed": 2**63}, "seed", "between 0 and", id="seed-too-big"),
    pytest.param({"prompt": "a", "guidance": "high"}, "guidance", "must be a number", id="guidance-string"),
    pytest.param({"prompt": "a", "guidance": 31}, "guidance", "between 0 and 30", id="guidance-too-high"),
    pytest.param({"prompt": "a", "num_images": 2}, "num_images", "unknown field 'num_images'", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "field", "message"), BAD_BODIES)
def test_bad_fields_are_named(body: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(server.BadRequest) as info:
        server.parse_generate(json.dumps(body).encode())
    assert info.value.field == field
    assert message in info.value.message


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"a cat"', b"\xff\xfe"])
def test_bodies_that_are_not_objects(raw: bytes) -> None:
    with pytest.raises(server.BadRequest) as info:
        server.parse_generate(raw)
    assert info.value.field is None


def test_nothing_to_load_is_known_before_torch_is_imported() -> None:
    server.check_model_source({"SDXL_RANDOM_INIT": "tiny"})
    server.check_model_source({"SDXL_MODEL": "stabilityai/stable-diffusion-xl-base-1.0"})  # a hub id: diffusers decides
    with pytest.raises(ValueError, match="set SDXL_MODEL"):
        server.check_model_source({})
    with pytest.raises(FileNotFoundError, match="SDXL_MODEL=/models/none does not exist"):
        server.check_model_source({"SDXL_MODEL": "/models/none"})


def test_server_config_from_env() -> None:
    assert server.server_config({}) == server.ServerConfig("127.0.0.1", 7860)
    assert server.server_config({"HOST": "0.0.0.0", "PORT": "9000"}) == server.ServerConfig("0.0.0.0", 9000)
    for port in ("x", "70000"):
        with pytest.raises(ValueError, match="PORT"):
            server.server_config({"PORT": port})


# -- the HTTP app, with a fake engine behind a gate -------------------------


def test_health_is_503_while_loading_then_200(gated: tuple[str, threading.Event, FakeEngine, Any]) -> None:
    base, gate, engine, app = gated
    r = request(base, "/health")
    assert r.status == 503 and r.json()["status"] == "loading" and r.headers["Retry-After"] == "1"
    r = request(base, "/generate", {"prompt": "a cat"})
    assert r.status == 503 and r.json()["status"] == "loading"
    r = request(base, "/generate", {"prompt": "a cat", "width": 7})  # bad input is a 400 even while loading
    assert r.status == 400 and r.json()["field"] == "width"
    assert request(base, "/vram").json() == {"status": "loading", "allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}
    assert engine.calls == []

    gate.set()
    assert app.loaded.wait(5)
    r = request(base, "/health")
    assert r.status == 200 and r.json()["status"] == "ready" and r.json()["attention"] == ["AttnProcessor2_0"]
    r = request(base, "/generate", {"prompt": "a cat", "seed": 42, "steps": 3, "width": 512, "height": 768})
    assert r.status == 200 and r.headers["Content-Type"] == "image/png" and r.body == b"\x89PNG fake"
    assert (r.headers["X-Seed"], r.headers["X-Peak-VRAM-Bytes"], r.headers["X-Generation-Seconds"]) == ("42", "123", "0.5000")
    # Every image is made on the one GPU thread, whichever HTTP thread asked.
    assert engine.calls == [("a cat", "", 3, 512, 768, 42, 5.0, "sdxl-gpu")]
    assert request(base, "/vram").json()["last_generate"] == {
        "peak_bytes": 123,
        "seconds": 0.5,
        "pipeline_seconds": 0.4,
        "encode_seconds": 0.1,
    }


def test_unknown_paths_and_oversized_bodies(gated: tuple[str, threading.Event, FakeEngine, Any]) -> None:
    base, gate, _, _ = gated
    gate.set()
    assert request(base, "/nope").status == 404
    assert request(base, "/generate").status == 404  # GET
    r = request(base, "/generate", raw=b"{" + b" " * (server.MAX_BODY_BYTES + 1) + b"}")
    assert r.status == 413


def test_a_failed_load_is_a_500_with_the_reason() -> None:
    def load() -> Any:
        raise FileNotFoundError("SDXL_MODEL=/models/x does not exist (is the models volume mounted?)")

    app = server.App(load)
    app.start()
    assert app.loaded.wait(5)
    status, doc = app.health()
    assert status == 500
    assert doc == {"status": "failed", "error": "FileNotFoundError: SDXL_MODEL=/models/x does not exist (is the models volume mounted?)"}


# -- the real server, as a subprocess, on the CPU ---------------------------


def generate(srv: RealServer, **body: Any) -> Reply:
    return request(srv.base, "/generate", {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64, **body})


def test_real_health_answers_503_while_torch_loads_then_200(real: RealServer) -> None:
    # The HTTP side is up within milliseconds; importing torch and diffusers takes seconds.
    assert real.statuses[0] == 503, real.statuses
    assert real.statuses[-1] == 200
    doc = request(real.base, "/health").json()
    assert doc["status"] == "ready" and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert doc["attention"] == ["AttnProcessor2_0"]  # PyTorch SDPA, never xformers


def test_real_image_has_the_asked_size(real: RealServer) -> None:
    r = generate(real, width=96, height=64, seed=1)
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == "image/png"
    assert png_size(r.body) == ((96, 64), "RGB")
    assert float(r.headers["X-Generation-Seconds"]) > 0 and r.headers["X-Peak-VRAM-Bytes"] == "0"


def test_real_seed_reproduces(real: RealServer) -> None:
    a, b, c = generate(real, seed=7), generate(real, seed=7), generate(real, seed=8)
    assert a.status == b.status == c.status == 200
    assert a.body == b.body  # same seed: the same bytes
    assert pixels(a.body) != pixels(c.body)  # another seed: another image
    r = generate(real)  # no seed: a random one, reported, and it reproduces
    seed = int(r.headers["X-Seed"])
    assert generate(real, seed=seed).body == r.body


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [p for p in BAD_BODIES if p.id in {"missing-prompt", "width-not-multiple-of-8", "height-too-big", "steps-zero", "unknown-field"}],
)
def test_real_bad_input_is_a_400_naming_the_field(real: RealServer, body: dict[str, Any], field: str, message: str) -> None:
    r = request(real.base, "/generate", body)
    assert r.status == 400
    assert r.json()["field"] == field and message in r.json()["error"]


def test_real_vram_is_zero_on_the_cpu(real: RealServer) -> None:
    doc = request(real.base, "/vram").json()
    assert doc["status"] == "ready" and doc["device"] == "cpu"
    assert doc["allocated_bytes"] == doc["reserved_bytes"] == doc["peak_bytes"] == 0


def test_real_health_answers_during_a_generation(real: RealServer) -> None:
    slow = threading.Thread(target=generate, args=(real,), kwargs={"steps": 20, "width": 256, "height": 256, "seed": 3})
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert request(real.base, "/health", timeout=5).status == 200
    assert time.monotonic() - started < 2
    slow.join(120)


def test_a_model_that_is_not_there_exits_1_with_the_reason() -> None:
    proc, log, _base = start_server({"SDXL_MODEL": "/nonexistent/sdxl-base", "SDXL_DEVICE": "cpu"})
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    time.sleep(0.1)
    assert rc == 1
    assert "SDXL_MODEL=/nonexistent/sdxl-base does not exist" in "".join(log)


# -- the engine in this process (torch) -------------------------------------


@pytest.fixture(scope="module")
def sp() -> Any:
    import sdxl_pipeline

    return sdxl_pipeline


def test_random_tiny_pipeline_is_sdxl_shaped_and_uses_sdpa(sp: Any) -> None:
    import torch

    engine = sp.Engine.load(sp.Settings(random_init="tiny", device="cpu", dtype=torch.float32))
    pipe = engine.pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae_scale_factor == 8  # like SDXL's VAE: sizes are multiples of 8
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in pipe.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    assert pipe.tokenizer("a cat").input_ids[0] == sp.BOS_ID and len(pipe.tokenizer("a cat", padding="max_length").input_ids) == 77


def test_tiling_only_above_1024_in_auto_mode(sp: Any) -> None:
    engine = sp.Engine(pipe=None, settings=sp.Settings(vae_tiling="auto"))
    assert not engine.wants_tiling(1024, 1024)
    assert engine.wants_tiling(1536, 1024)
    assert sp.Engine(pipe=None, settings=sp.Settings(vae_tiling="on")).wants_tiling(64, 64)
    assert not sp.Engine(pipe=None, settings=sp.Settings(vae_tiling="off")).wants_tiling(2048, 2048)


def test_model_settings_from_env(sp: Any) -> None:
    import torch

    s = server.model_settings(
        {
            "SDXL_RANDOM_INIT": "tiny",
            "SDXL_DEVICE": "cpu",
            "SDXL_VAE_SLICING": "0",
            "SDXL_VAE_TILING": "1",
            "SDXL_LORAS": "/l/a.safetensors:0.7, /l/b.safetensors",
        }
    )
    assert (s.device, s.dtype, s.vae_slicing, s.vae_tiling, s.png_compress_level) == ("cpu", torch.float32, False, "on", 0)
    assert list(s.loras) == [("/l/a.safetensors", 0.7), ("/l/b.safetensors", 1.0)]
    assert server.model_settings({"SDXL_DEVICE": "cuda", "SDXL_DTYPE": "bf16"}).dtype == torch.bfloat16
    assert server.model_settings({"SDXL_DEVICE": "cuda"}).dtype == torch.float16
    for env, name in [
        ({"SDXL_DTYPE": "int8"}, "SDXL_DTYPE"),
        ({"SDXL_VAE_TILING": "maybe"}, "SDXL_VAE_TILING"),
        ({"SDXL_RANDOM_INIT": "huge"}, "SDXL_RANDOM_INIT"),
    ]:
        with pytest.raises(ValueError, match=name):
            server.model_settings({"SDXL_DEVICE": "cpu", **env})


def test_png_writer_round_trips(sp: Any) -> None:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    for level in (0, 1):
        data = sp.encode_png(Image.fromarray(arr), level)
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (80, 48) and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), arr)


def test_loras_load_with_their_weights(sp: Any, tmp_path: Path) -> None:
    """A LoRA made here for the tiny UNet: weight 1 changes the image, weight 0 gives the base image back."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = sp.build_random_pipeline("tiny", "cpu", torch.float32, seed=1)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet))
    )
    lora = str(tmp_path / "pytorch_lora_weights.safetensors")

    def image(loras: tuple[tuple[str, float], ...]) -> bytes:
        engine = sp.Engine.load(sp.Settings(random_init="tiny", device="cpu", dtype=torch.float32, loras=loras))
        if loras:
            assert engine.describe()["loras"] == [{"path": lora, "weight": loras[0][1]}]
        return bytes(engine.generate("a cat", "", 2, 64, 64, 5, 5.0).png)

    base = image(())
    assert image(((lora, 1.0),)) != base
    assert image(((lora, 0.0),)) == base


# -- sleep and wake ---------------------------------------------------------


def test_sleep_and_wake_over_http_with_503_while_asleep(gated: tuple[str, threading.Event, FakeEngine, Any]) -> None:
    base, gate, engine, app = gated
    r = request(base, "/sleep?level=1", raw=b"")
    assert r.status == 503 and r.headers["Retry-After"] == "1"  # still loading
    gate.set()
    assert app.loaded.wait(5)
    doc = request(base, "/is_sleeping").json()
    assert doc == {"is_sleeping": False, "state": "awake", "level": 0, "host_bytes": 0, "host_memory": "none"}
    assert request(base, "/sleep?level=3", raw=b"").json()["field"] == "level"
    r = request(base, "/sleep?level=2&mode=wait", raw=b"")
    assert r.status == 200 and r.json()["is_sleeping"] is True and r.json()["level"] == 2
    assert request(base, "/is_sleeping").json()["state"] == "asleep" and request(base, "/is_sleeping").json()["level"] == 2
    h = request(base, "/health")
    assert h.status == 200 and h.json()["status"] == "asleep"
    r = request(base, "/generate", {"prompt": "a cat", "seed": 1})
    assert r.status == 503 and r.headers["Retry-After"] == "1" and "asleep" in r.json()["error"]
    r = request(base, "/v1/images/generations", {"prompt": "a cat"})
    assert r.status == 503 and r.json()["error"]["code"] == "model_asleep"
    assert request(base, "/sleep?level=1", raw=b"").json()["level"] == 2  # asleep already: nothing done
    r = request(base, "/wake_up", raw=b"")
    assert r.status == 200 and r.json()["is_sleeping"] is False
    assert request(base, "/wake_up", raw=b"").json()["seconds"] == 0.0  # awake already
    assert request(base, "/generate", {"prompt": "a cat", "seed": 1}).status == 200
    assert [c[0] for c in engine.calls] == ["sleep", "wake", "a cat"]
    assert all(c[-1] == "sdxl-gpu" for c in engine.calls)  # torch's one thread does it all


def test_an_image_queued_behind_a_sleep_gets_503_not_a_hang(gated: tuple[str, threading.Event, FakeEngine, Any]) -> None:
    base, gate, engine, app = gated
    gate.set()
    assert app.loaded.wait(5)
    engine.sleep_gate = threading.Event()
    sleeper = threading.Thread(target=request, args=(base, "/sleep?level=1"), kwargs={"raw": b""})
    sleeper.start()
    deadline = time.monotonic() + 5
    while app.sleep_state != "sleeping" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.sleep_state == "sleeping"
    # Asked while it goes to sleep: refused at once.
    started = time.monotonic()
    r = request(base, "/generate", {"prompt": "late", "seed": 2}, timeout=5)
    assert r.status == 503 and r.json()["status"] == "sleeping" and time.monotonic() - started < 2
    engine.sleep_gate.set()
    sleeper.join(10)
    # An image that reached the queue before the sleep's state changed is refused on the GPU thread.
    app.sleep_state = "awake"  # as if the handler's check ran just before the sleep job
    engine.asleep = 0
    threading.Thread(target=app.sleep, args=(1,)).start()
    with pytest.raises(server.NotAwake):
        for _ in range(50):  # bounded: the sleep job runs within a few of these
            app.generate(server.GenerateRequest("x", seed=3), 3)
    assert engine.calls[-1][0] == "sleep"  # no image ran after the sleep


@pytest.mark.parametrize("level", [1, 2])
def test_engine_output_is_identical_after_a_sleep_cycle(sp: Any, level: int) -> None:
    import torch

    engine = sp.Engine.load(sp.Settings(random_init="tiny", device="cpu", dtype=torch.float32, sleep_pinned=True))
    # No CUDA here: the host buffers cannot be pinned, and it says so.
    assert engine.host is not None and engine.host.how == "pageable"
    assert engine.host.nbytes >= sum(t.numel() * t.element_size() for _, t in sp.weight_tensors(engine.pipe))
    before = engine.generate("a lighthouse", "", 2, 64, 64, 11, 5.0).png
    weights = sum(t.numel() for _, t in sp.weight_tensors(engine.pipe))
    doc = engine.sleep(level)
    assert doc["level"] == level and doc["host_bytes"] == (engine.host.nbytes if level == 1 else 0)
    assert sum(t.numel() for _, t in sp.weight_tensors(engine.pipe)) == 0  # nothing left of the weights
    with pytest.raises(sp.Asleep):
        engine.generate("a lighthouse", "", 2, 64, 64, 11, 5.0)
    assert engine.sleep(level)["seconds"] == 0.0  # asleep already
    assert engine.wake()["level"] == level
    assert sum(t.numel() for _, t in sp.weight_tensors(engine.pipe)) == weights
    assert engine.generate("a lighthouse", "", 2, 64, 64, 11, 5.0).png == before
    # A second cycle too (host buffers reused; for level 2 the rebuilt pipeline's names match).
    engine.sleep(1)
    engine.wake()
    assert engine.generate("a lighthouse", "", 2, 64, 64, 11, 5.0).png == before


def test_level_1_without_pinned_buffers_allocates_them_at_sleep_and_warns(sp: Any, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    engine = sp.Engine.load(sp.Settings(random_init="tiny", device="cpu", dtype=torch.float32))
    assert engine.host is None
    before = engine.generate("a cat", "", 2, 64, 64, 5, 5.0).png
    with caplog.at_level("WARNING", logger="sdxl"):
        assert engine.sleep(1)["host_memory"] == "pageable"
    assert "without SDXL_SLEEP=1" in caplog.text
    engine.wake()
    assert engine.generate("a cat", "", 2, 64, 64, 5, 5.0).png == before


@pytest.mark.parametrize("level", ["1", "2"])
def test_real_server_sleeps_wakes_and_draws_the_same_image(real: RealServer, level: str) -> None:
    before = generate(real, seed=21)
    assert before.status == 200
    r = request(real.base, f"/sleep?level={level}", raw=b"")
    assert r.status == 200 and r.json()["is_sleeping"] is True, r.body
    assert request(real.base, "/is_sleeping").json()["is_sleeping"] is True
    asleep = generate(real, seed=21)
    assert asleep.status == 503 and asleep.headers["Retry-After"] == "1"
    assert request(real.base, "/health").status == 200
    r = request(real.base, "/wake_up", raw=b"")
    assert r.status == 200 and r.json()["is_sleeping"] is False
    after = generate(real, seed=21)
    assert after.status == 200 and after.body == before.body

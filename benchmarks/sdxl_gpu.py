#!/usr/bin/env python3
"""SDXL on a GPU: seconds per image and peak VRAM through vramctl's SDXL server,
the same pipeline called directly in the same run, and the VAE options' VRAM.

    python benchmarks/sdxl_gpu.py                     # full SDXL size, 1024x1024, 30 steps, cuda
    python benchmarks/sdxl_gpu.py --tiny --steps 2 --size 256   # CPU dry run

The pipeline is ``SDXL_RANDOM_INIT=full``: the real SDXL base 1.0 shapes (fp16
UNet, VAE and both text encoders) with random weights, so no download is
needed and the time and memory are those of the real model. The server
(images/sdxl/server.py) runs in this process on a loopback port and is driven
over HTTP exactly as vramctl's users drive it; the direct calls use the very
same pipeline object, interleaved with the HTTP ones, so the overhead ratio
compares like with like (target: at most 1.03).

(a) HTTP: one warm-up image, then --runs timed POST /generate (client wall time,
    the server's own X-Generation-Seconds, X-Peak-VRAM-Bytes).
(b) direct: --runs timed ``pipe(...)`` calls (PIL image out, as the server gets),
    interleaved with (a); overhead ratio = median(a) / median(b).
(c) peak VRAM of one image with VAE slicing and tiling off / on (--vae-steps
    denoising steps: the peak is in the VAE decode, not in the step count).

Prints the device and versions and a summary; writes everything as JSON to
$OUT/sdxl_gpu.json when OUT is set (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "images" / "sdxl"))

PROMPT = "a lighthouse on a cliff at sunset, volumetric light, highly detailed photograph"
NEGATIVE = "blurry, low quality"
GUIDANCE = 5.0


def post_generate(base: str, body: dict[str, Any], timeout: float = 600.0) -> tuple[bytes, dict[str, str], float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/generate", data=data, headers={"Content-Type": "application/json"}, method="POST")
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        png = resp.read()
        headers = dict(resp.headers.items())
    return png, headers, time.perf_counter() - started


def wait_healthy(base: str, timeout: float) -> tuple[float, list[int]]:
    """Poll /health until 200; returns the seconds it took and the statuses seen (503s first)."""
    started = time.perf_counter()
    seen: list[int] = []
    while time.perf_counter() - started < timeout:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                seen.append(resp.status)
                return time.perf_counter() - started, seen
        except urllib.error.HTTPError as exc:
            seen.append(exc.code)
            if exc.code == 500:
                raise SystemExit(f"the server failed to load: {exc.read().decode(errors='replace')}") from None
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s (statuses {seen[-5:]})")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mib(n: int | float) -> float:
    return round(n / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL-shaped pipeline (CPU dry runs) instead of full size")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024, help="width = height, a multiple of 8")
    ap.add_argument("--runs", type=int, default=3, help="timed images for (a) and for (b) each")
    ap.add_argument("--vae-steps", type=int, default=4, help="denoising steps for each (c) image")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float16 (default on cuda), bfloat16, float32 (default on cpu)")
    ap.add_argument("--json", dest="json_path", default=None, help="where to write the JSON (default $OUT/sdxl_gpu.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    import diffusers
    import sdxl_pipeline as sp
    import server as sdxl_server
    import transformers

    device = args.device or sp.default_device()
    cuda = device.startswith("cuda")
    size = "tiny" if args.tiny else "full"
    env = {
        "SDXL_RANDOM_INIT": size,
        "SDXL_DEVICE": device,
        "SDXL_VAE_SLICING": "1",
        "SDXL_VAE_TILING": "auto",
        "SDXL_PNG_COMPRESS": os.environ.get("SDXL_PNG_COMPRESS", "1"),
    }
    if args.dtype:
        env["SDXL_DTYPE"] = args.dtype

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "pipeline": f"SDXL_RANDOM_INIT={size}",
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "guidance": GUIDANCE,
    }
    print(f"device: {device} {info['gpu'] or ''}".rstrip())
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), diffusers {info['diffusers']}, transformers {info['transformers']}, python {info['python']}")

    # The server, in this process, on a free loopback port.
    app = sdxl_server.App(lambda: sdxl_server.load_engine(env))
    httpd = sdxl_server.make_server(app, sdxl_server.ServerConfig("127.0.0.1", 0))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    app.start_loading()
    load_s, statuses = wait_healthy(base, timeout=900)
    engine = app.engine
    assert engine is not None
    pipe = engine.pipe
    if cuda:
        torch.cuda.synchronize()
    weights_bytes = int(torch.cuda.memory_allocated()) if cuda else 0
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
    print(f"loaded in {load_s:.1f} s (health statuses {statuses[0]}..{statuses[-1]}), weights {mib(weights_bytes)} MiB, {health['dtype']}, attention {health['attention']}")
    info |= {"dtype": health["dtype"], "attention": health["attention"], "load_seconds": round(load_s, 3), "weights_bytes": weights_bytes}

    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": args.steps, "width": args.size, "height": args.size, "guidance": GUIDANCE}

    def direct(seed: int) -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.inference_mode():
            image = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                guidance_scale=GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
            ).images[0]
        elapsed = time.perf_counter() - started  # the PIL image is on the host: the GPU is done
        assert image.size == (args.size, args.size)
        return elapsed, int(torch.cuda.max_memory_allocated()) if cuda else 0

    # Warm-up: kernels, cuDNN autotuning, allocator pools; one through each path.
    _, _, warm_http = post_generate(base, {**body, "seed": 0})
    warm_direct, _ = direct(0)
    print(f"warm-up: http {warm_http:.2f} s, direct {warm_direct:.2f} s")

    http_runs: list[dict[str, Any]] = []
    direct_runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        seed = 1000 + i
        png, headers, wall = post_generate(base, {**body, "seed": seed})
        http_runs.append(
            {
                "seed": seed,
                "seconds": round(wall, 4),
                "server_seconds": float(headers.get("X-Generation-Seconds", "nan")),
                "peak_bytes": int(headers.get("X-Peak-VRAM-Bytes", "0")),
                "png_bytes": len(png),
            }
        )
        secs, peak = direct(seed)
        direct_runs.append({"seed": seed, "seconds": round(secs, 4), "peak_bytes": peak})
        print(f"run {i + 1}/{args.runs}: http {wall:.3f} s (server {http_runs[-1]['server_seconds']:.3f} s), direct {secs:.3f} s")

    http_med = median([r["seconds"] for r in http_runs])
    direct_med = median([r["seconds"] for r in direct_runs])
    ratio = http_med / direct_med if direct_med else float("nan")
    vram = json.loads(urllib.request.urlopen(base + "/vram", timeout=5).read())

    # (c) VAE slicing / tiling: peak VRAM of one image each, on the same pipeline.
    vae = pipe.vae
    vae_rows: list[dict[str, Any]] = []
    saved_steps = args.steps
    args.steps = args.vae_steps
    try:
        for slicing, tiling in ((False, False), (True, False), (False, True), (True, True)):
            (vae.enable_slicing if slicing else vae.disable_slicing)()
            (vae.enable_tiling if tiling else vae.disable_tiling)()
            secs, peak = direct(7)
            vae_rows.append({"slicing": slicing, "tiling": tiling, "peak_bytes": peak, "seconds": round(secs, 4)})
            print(f"vae slicing={'on ' if slicing else 'off'} tiling={'on ' if tiling else 'off'}: peak {mib(peak)} MiB ({args.vae_steps} steps, {secs:.2f} s)")
    finally:
        args.steps = saved_steps
        vae.enable_slicing() if engine.settings.vae_slicing else vae.disable_slicing()
        vae.disable_tiling()

    result = {
        **info,
        "http": {
            "warmup_seconds": round(warm_http, 4),
            "runs": http_runs,
            "median_seconds": round(http_med, 4),
            "peak_bytes": max((r["peak_bytes"] for r in http_runs), default=0),
        },
        "direct": {
            "warmup_seconds": round(warm_direct, 4),
            "runs": direct_runs,
            "median_seconds": round(direct_med, 4),
            "peak_bytes": max((r["peak_bytes"] for r in direct_runs), default=0),
        },
        "server_overhead_ratio": round(ratio, 4),
        "server_overhead_target": 1.03,
        "server_overhead_ok": bool(ratio <= 1.03),
        "vram_endpoint": vram,
        "vae": {"steps": args.vae_steps, "size": args.size, "variants": vae_rows},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(
        f"\nSDXL {size} {args.size}x{args.size}, {args.steps} steps on {info['gpu'] or device}:"
        f"\n  http    {http_med:.3f} s/image (median of {args.runs}), peak {mib(result['http']['peak_bytes'])} MiB"
        f"\n  direct  {direct_med:.3f} s/image, peak {mib(result['direct']['peak_bytes'])} MiB"
        f"\n  server overhead ratio {ratio:.4f} (target <= 1.03: {'ok' if ratio <= 1.03 else 'MISSED'})"
        f"\n  total {result['total_seconds']} s"
    )
    out_path = args.json_path or (os.path.join(os.environ["OUT"], "sdxl_gpu.json") if os.environ.get("OUT") else None)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out_path}")
    httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

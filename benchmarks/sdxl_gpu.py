#!/usr/bin/env python3
"""SDXL on a GPU: seconds per image and peak VRAM through vramctl's SDXL server,
the same pipeline called directly in the same run, and the VAE options' VRAM.

    python benchmarks/sdxl_gpu.py                     # full SDXL size, 1024x1024, 30 steps, cuda
    python benchmarks/sdxl_gpu.py --tiny --steps 2 --size 256   # CPU dry run

The pipeline is ``SDXL_RANDOM_INIT=full``: the real SDXL base 1.0 shapes (fp16
UNet, VAE and both text encoders) with random weights, so no download is
needed and the time and memory are those of the real model. The server
(images/sdxl/server.py) runs as users run it, in its own process on a
loopback port, driven over HTTP; the direct calls go to the same pipeline,
built the same way (same configs, same seed: the same weights) in this
process, on its main thread as in the server, interleaved with the HTTP
ones, so the overhead ratio compares like with like (target: at most 1.03).
Both copies fit at once: about 7 GB of weights each on an 80 GB card.

(a) HTTP: --warmup untimed images, then --runs timed POST /generate (client wall
    time; the server's own X-Generation-Seconds split into pipeline and PNG
    encoding; X-Peak-VRAM-Bytes).
(b) direct: as many ``pipe(...)`` calls (PIL image out, as the server gets),
    interleaved with (a), alternating which goes first; overhead ratio = the
    median over runs of (a) / (b) of the same run (neighbours in time, so
    clock drift cancels), and the ratio of the medians beside it.
(c) peak VRAM of one direct image with VAE slicing and tiling off / on, at --size and
    at --vae-large (--vae-steps denoising steps: the peak is in the VAE decode,
    not in the step count; SDXL's VAE tiles only above its 1024 px tile, and
    slicing only splits a batch).

Prints the device and versions and a summary; writes everything as JSON to
$OUT/sdxl_gpu.json when OUT is set (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from free_ports import free_port

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


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> tuple[float, list[int]]:
    """Poll /health until 200; returns the seconds it took and the statuses seen (503s first)."""
    started = time.perf_counter()
    seen: list[int] = []
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the server exited with {proc.returncode} before it was healthy:\n{tail}")
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
    ap.add_argument("--runs", type=int, default=12, help="timed images for (a) and for (b) each")
    ap.add_argument("--warmup", type=int, default=2, help="untimed images through each path first")
    ap.add_argument("--vae-steps", type=int, default=4, help="denoising steps for each (c) image")
    ap.add_argument(
        "--vae-large", type=int, default=None, help="the second (c) size, where tiling engages (default 2048; --tiny: 2 x --size)"
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float16 (default on cuda), bfloat16, float32 (default on cpu)")
    ap.add_argument("--json", dest="json_path", default=None, help="where to write the JSON (default $OUT/sdxl_gpu.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import diffusers
    import sdxl_pipeline as sp
    import torch
    import transformers

    if args.vae_large is None:
        args.vae_large = 2 * args.size if args.tiny else 2048
    device = args.device or sp.default_device()
    cuda = device.startswith("cuda")
    size = "tiny" if args.tiny else "full"
    env = {
        "SDXL_RANDOM_INIT": size,
        "SDXL_DEVICE": device,
        "SDXL_VAE_SLICING": "1",
        "SDXL_VAE_TILING": "auto",
    }
    if os.environ.get("SDXL_PNG_COMPRESS"):
        env["SDXL_PNG_COMPRESS"] = os.environ["SDXL_PNG_COMPRESS"]
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
    print(
        f"torch {info['torch']} (CUDA {info['torch_cuda']}), diffusers {info['diffusers']}, transformers {info['transformers']}, python {info['python']}"
    )

    # The server as users run it: its own process (generating on its main
    # thread), on a free loopback port. Started first, so its load time is
    # the real one (imports included).
    port = free_port()
    out_dir = os.environ.get("OUT")
    log_path = Path(out_dir) / "sdxl_server.log" if out_dir else Path(tempfile.mkstemp(prefix="sdxl-server-", suffix=".log")[1])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")} | env | {"HOST": "127.0.0.1", "PORT": str(port)}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "images" / "sdxl" / "server.py")], env=server_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        return run(args, info, env, base, proc, log_path, t_start)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace, info: dict[str, Any], env: dict[str, str], base: str, proc: Any, log_path: Path, t_start: float) -> int:
    import sdxl_pipeline as sp
    import torch

    cuda = info["device"].startswith("cuda")
    load_s, statuses = wait_healthy(base, proc, log_path, timeout=900)
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
    server_vram = json.loads(urllib.request.urlopen(base + "/vram", timeout=5).read())
    weights_bytes = int(server_vram.get("allocated_bytes", 0))
    print(
        f"server healthy {load_s:.1f} s after its start (statuses {statuses[0]}..{statuses[-1]}), weights {mib(weights_bytes)} MiB,"
        f" {health['dtype']}, attention {health['attention']}; log {log_path}"
    )

    # The same pipeline, built the same way, in this process for the direct calls.
    built = time.perf_counter()
    engine = sp.Engine.load(
        sp.Settings(
            random_init=env["SDXL_RANDOM_INIT"],
            device=info["device"],
            dtype=sp.parse_dtype(env.get("SDXL_DTYPE"), info["device"]),
            vae_slicing=True,
            vae_tiling="auto",
        )
    )
    pipe = engine.pipe
    direct_build_s = time.perf_counter() - built
    print(f"direct pipeline built in {direct_build_s:.1f} s (torch already imported)")
    info |= {
        "dtype": health["dtype"],
        "attention": health["attention"],
        "server_load_seconds": round(load_s, 3),
        "direct_build_seconds": round(direct_build_s, 3),
        "weights_bytes": weights_bytes,
    }

    body = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "guidance": GUIDANCE,
    }

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

    # Warm-up: kernels, allocator pools, the VAE's fp32 upcast; through both paths.
    warm_http: list[float] = []
    warm_direct: list[float] = []
    for i in range(args.warmup):
        warm_http.append(post_generate(base, {**body, "seed": i})[2])
        warm_direct.append(direct(i)[0])
    print("warm-up: http " + ", ".join(f"{x:.2f}" for x in warm_http) + " s; direct " + ", ".join(f"{x:.2f}" for x in warm_direct) + " s")

    http_runs: list[dict[str, Any]] = []
    direct_runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        seed = 1000 + i

        def one_http(seed: int = seed) -> None:
            png, headers, wall = post_generate(base, {**body, "seed": seed})
            http_runs.append(
                {
                    "seed": seed,
                    "seconds": round(wall, 4),
                    "server_seconds": float(headers.get("X-Generation-Seconds", "nan")),
                    "pipeline_seconds": float(headers.get("X-Pipeline-Seconds", "nan")),
                    "encode_seconds": float(headers.get("X-Encode-Seconds", "nan")),
                    "peak_bytes": int(headers.get("X-Peak-VRAM-Bytes", "0")),
                    "png_bytes": len(png),
                }
            )

        def one_direct(seed: int = seed) -> None:
            secs, peak = direct(seed)
            direct_runs.append({"seed": seed, "seconds": round(secs, 4), "peak_bytes": peak})

        # Alternate which path goes first, so drift (clocks, heat) hits both alike.
        for step in (one_http, one_direct) if i % 2 == 0 else (one_direct, one_http):
            step()
        h, d = http_runs[-1], direct_runs[-1]
        print(
            f"run {i + 1}/{args.runs}: http {h['seconds']:.3f} s (server {h['server_seconds']:.3f} = pipeline {h['pipeline_seconds']:.3f}"
            f" + png {h['encode_seconds']:.3f}), direct {d['seconds']:.3f} s"
        )

    http_med = median([r["seconds"] for r in http_runs])
    direct_med = median([r["seconds"] for r in direct_runs])
    # Each HTTP image against the direct one next to it in time: drift cancels.
    ratio = median([h["seconds"] / d["seconds"] for h, d in zip(http_runs, direct_runs, strict=True)])
    ratio_of_medians = http_med / direct_med if direct_med else float("nan")
    # What the server adds around the very same pipeline call (PNG, HTTP, queue):
    # free of run-to-run GPU noise, since both sides come from the same image.
    fixed = median([h["seconds"] / h["pipeline_seconds"] for h in http_runs])
    vram = json.loads(urllib.request.urlopen(base + "/vram", timeout=5).read())

    # (c) VAE slicing / tiling: peak VRAM of one image each, on the same pipeline,
    # at --size and at --vae-large (SDXL's VAE tiles only above its 1024 px tile).
    vae = pipe.vae
    vae_rows: list[dict[str, Any]] = []
    saved = (args.steps, args.size)
    args.steps = args.vae_steps
    try:
        for side in dict.fromkeys([saved[1], args.vae_large]):
            args.size = side
            for slicing, tiling in ((False, False), (True, False), (False, True), (True, True)):
                (vae.enable_slicing if slicing else vae.disable_slicing)()
                (vae.enable_tiling if tiling else vae.disable_tiling)()
                secs, peak = direct(7)
                vae_rows.append({"size": side, "slicing": slicing, "tiling": tiling, "peak_bytes": peak, "seconds": round(secs, 4)})
                print(
                    f"vae {side}px slicing={'on ' if slicing else 'off'} tiling={'on ' if tiling else 'off'}: "
                    f"peak {mib(peak)} MiB ({args.vae_steps} steps, {secs:.2f} s)"
                )
    finally:
        args.steps, args.size = saved
        vae.enable_slicing()
        vae.disable_tiling()

    result = {
        **info,
        "http": {
            "warmup_seconds": [round(x, 4) for x in warm_http],
            "runs": http_runs,
            "median_seconds": round(http_med, 4),
            "peak_bytes": max((r["peak_bytes"] for r in http_runs), default=0),
        },
        "direct": {
            "warmup_seconds": [round(x, 4) for x in warm_direct],
            "runs": direct_runs,
            "median_seconds": round(direct_med, 4),
            "peak_bytes": max((r["peak_bytes"] for r in direct_runs), default=0),
        },
        "server_overhead_ratio": round(ratio, 4),
        "server_overhead_ratio_of_medians": round(ratio_of_medians, 4),
        "server_overhead_ratio_note": "median over runs of http_seconds / direct_seconds of the same run (adjacent in time)",
        "server_fixed_overhead_ratio": round(fixed, 4),
        "server_fixed_overhead_note": "median of http wall seconds / the server's own pipeline seconds for the same image",
        "server_overhead_target": 1.03,
        "server_overhead_ok": bool(ratio <= 1.03),
        "vram_endpoint": vram,
        "vae": {"steps": args.vae_steps, "variants": vae_rows},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(
        f"\nSDXL {env['SDXL_RANDOM_INIT']} {args.size}x{args.size}, {args.steps} steps on {info['gpu'] or info['device']}:"
        f"\n  http    {http_med:.3f} s/image (median of {args.runs}), peak {mib(result['http']['peak_bytes'])} MiB"
        f"\n  direct  {direct_med:.3f} s/image, peak {mib(result['direct']['peak_bytes'])} MiB"
        f"\n  server overhead ratio {ratio:.4f} paired, {ratio_of_medians:.4f} of medians (target <= 1.03: {'ok' if ratio <= 1.03 else 'MISSED'})"
        f"\n  server's own additions (PNG, HTTP, queue) around the same pipeline call: ratio {fixed:.4f}"
        f"\n  total {result['total_seconds']} s"
    )
    out_path = args.json_path or (os.path.join(os.environ["OUT"], "sdxl_gpu.json") if os.environ.get("OUT") else None)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

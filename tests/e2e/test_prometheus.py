"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes a real `vramctl up`
on the stand-in demo stack (docker runtime, simulated GPU) every second while
it switches llm -> sdxl -> llm; then every query of every dashboard panel,
with the dashboard's variables filled in, must return data.

The scrape config is compose/monitoring/prometheus.yml with the target and
interval changed, so the shipped file is exercised too.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.live_up import LiveUp, standin_model

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "vramctl" / "dashboards" / "vramctl.json"
PROMETHEUS = "/usr/bin/prometheus"

# What Grafana would put in for the dashboard's variables: this test's job,
# every instance, GPU 0; a rate window holding this short test's switches.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "5m",
    "$job": "vramctl",
    "$instance": ".+",
    "$gpu": "0",
}


class Prometheus:
    def __init__(self, tmp: Path, port: int, target: str) -> None:
        config = yaml.safe_load((ROOT / "compose" / "monitoring" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        for job in config["scrape_configs"]:
            job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
            job["static_configs"] = [{"targets": [target]}]
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout}s:\n{self.log.read_text()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:  # 400 for a query that does not parse
            body = json.loads(err.read())
        assert body.get("status") == "success", f"{expr}\n-> {body}"
        return body["data"]["result"]  # type: ignore[no-any-return]

    def wait_for(self, expr: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.time() + timeout
        result: list[dict[str, Any]] = []
        while time.time() < deadline:
            result = self.query(expr)
            if pred(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: condition not met within {timeout}s; last result {result}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[Callable[[str], Prometheus]]:
    if shutil.which(PROMETHEUS) is None:
        pytest.fail(f"{PROMETHEUS} not found: run `bash .ci/setup-infra.sh` (installs Debian's prometheus)", pytrace=False)
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        p = Prometheus(tmp_path, free_port(), target)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def panel_queries() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel, variables filled in."""
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace("${" + var[1:] + "}", value).replace(var, value)
            assert "$" not in expr, f"panel {p['id']} {t['refId']}: unknown variable left in {expr}"
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", expr))
    return out


def _value(result: list[dict[str, Any]], **labels: str) -> float | None:
    for r in result:
        if all(r["metric"].get(k) == v for k, v in labels.items()):
            return float(r["value"][1])
    return None


def test_every_dashboard_query_returns_data(
    vramctl: Callable[[dict[str, Any]], LiveUp], prometheus: Callable[[str], Prometheus], free_port: Callable[[], int]
) -> None:
    llm, sdxl, tts = free_port(), free_port(), free_port()
    v = vramctl(
        {
            "runtime": "docker",
            "gpuProbe": {"kind": "simulated", "totalMiB": 16303, "baselineMiB": 400, "releaseDelaySeconds": 0.3},
            "gpus": [
                {
                    "gpu": 0,
                    "activeModel": "llm",
                    "companions": ["tts"],
                    "switching": {"mode": "onDemand"},
                    "models": {
                        # Sleeps instead of stopping: the warm switch's series (residue, strategy) get data.
                        "llm": {
                            **standin_model(llm, 12000, load=0.5, STANDIN_SLEEP="1", STANDIN_RESIDUE_MIB="600"),
                            "switchStrategy": "sleep",
                            "sleep": {
                                "level": 2,
                                "maxResidueMiB": 1024,
                                "path": "/sleep",
                                "wakePath": "/wake_up",
                                "statePath": "/is_sleeping",
                            },
                        },
                        "sdxl": standin_model(sdxl, 11000, load=0.5),
                        "tts": standin_model(tts, 3500, cls="light", load=0.3),
                    },
                }
            ],
        }
    )
    gateway = free_port()
    v.extra_args = ["--gateway", f"127.0.0.1:{gateway}"]
    v.start()
    prom = prometheus(f"127.0.0.1:{v.port}")
    prom.wait_ready()
    prom.wait_for('up{job="vramctl"}', lambda r: _value(r) == 1.0)

    for model in ("sdxl", "llm"):
        r = v.cli("switch", model, "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        # Scraped after the switch: the holder Prometheus saw is the new one.
        prom.wait_for('vramctl_active_model{gpu="0"}', lambda res, m=model: _value(res, model=m) == 1.0)  # type: ignore[misc]
    prom.wait_for('sum(increase(vramctl_switches_total{outcome="success"}[1m]))', lambda res: (_value(res) or 0) >= 1.5)
    # Request-driven switching: a hold (the queue's series) and requests through the gateway (its series).
    r = v.cli("hold", "--url", v.url, "sdxl", "--", "true")
    assert r.returncode == 0, r.stdout + r.stderr
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway}/models/sdxl/health", timeout=30) as resp:
            assert resp.status == 200
    prom.wait_for("sum(vramctl_gateway_requests_total)", lambda res: (_value(res) or 0) >= 3)
    prom.wait_for("sum(vramctl_queue_wait_seconds_count)", lambda res: (_value(res) or 0) >= 1)
    # A rate needs two scrapes of a series: wait for the second one of the newest series.
    for series in ("vramctl_gateway_requests_total", "vramctl_gateway_request_duration_seconds_count", "vramctl_queue_wait_seconds_count"):
        prom.wait_for(f"count(rate({series}[1m]))", lambda res: (_value(res) or 0) >= 1)

    empty, bad = [], []
    for where, expr in panel_queries():
        result = prom.query(expr)
        if not result:
            empty.append(f"{where}: {expr}")
        elif not all(math.isfinite(float(s["value"][1])) for s in result):
            bad.append(f"{where}: {expr} -> {[s['value'][1] for s in result]}")
    assert not empty, "panels with no data:\n  " + "\n  ".join(empty)
    assert not bad, "panels with NaN/Inf values:\n  " + "\n  ".join(bad)

    # A few values that must be right, not merely present.
    assert _value(prom.query('vramctl_model_state{gpu="0",state="running"}'), model="sdxl") == 1.0  # the hold's model
    assert _value(prom.query('vramctl_model_state{gpu="0",state="asleep"}'), model="llm") == 1.0  # slept, not stopped
    assert _value(prom.query('vramctl_model_sleep_residue_bytes{gpu="0"}'), model="llm") == 600 * 2**20
    assert (_value(prom.query('sum(vramctl_switch_duration_seconds_count{gpu="0",strategy="warm"})')) or 0) >= 1
    assert _value(prom.query("sum(vramctl_sleep_fallbacks_total)")) == 0.0
    assert _value(prom.query('vramctl_gpu_memory_total_bytes{gpu="0"}'), UUID="SIM-GPU-0") == 16303 * 2**20
    assert _value(prom.query('vramctl_model_gpu_memory_bytes{gpu="0"}'), model="sdxl") == 11000 * 2**20
    assert _value(prom.query("sum(vramctl_exclusivity_violations_total)")) == 0.0
    assert _value(prom.query('vramctl_nvml_up{gpu="0"}')) == 0.0  # simulated: said so

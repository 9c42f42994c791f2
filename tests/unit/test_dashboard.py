"""The Grafana dashboard: one source of truth, well-formed, and wired into the
compose stack's provisioning without a copy.

charts/vramctl/dashboards/vramctl.json is the only dashboard file. The Helm
chart loads it with .Files.Get and the compose stack mounts its directory; a
copy anywhere else (compose, manifests, a ConfigMap) must be identical, and
this test fails the moment one drifts. That every panel's query returns data
from a real Prometheus is tests/e2e/test_prometheus.py's job.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fakes import FakeGpu, FakeRuntime
from tests.support.workers import spec
from vramctl.observed import WorkloadState
from vramctl.telemetry import VramctlCollector
from vramctl.web.gateway import GatewayMetrics
from vramctl.worker.actor import GpuWorker, Metrics, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "charts" / "vramctl" / "dashboards" / "vramctl.json"
COMPOSE = ROOT / "compose" / "docker-compose.yml"
PROVISIONING = ROOT / "compose" / "monitoring" / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def dashboard() -> dict[str, Any]:
    return json.loads(SOURCE.read_text())  # type: ignore[no-any-return]


def repo_files() -> list[Path]:
    """Tracked and untracked files that git does not ignore (no venvs, no build outputs)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def _is_dashboard(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("panels"), list) and ("uid" in obj or "title" in obj)


def _embedded(obj: object) -> Iterator[dict[str, Any]]:
    """Dashboards inside a loaded YAML/JSON document: the document itself, or a
    string value holding dashboard JSON (a ConfigMap's data)."""
    if _is_dashboard(obj):
        yield obj  # type: ignore[misc]
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _embedded(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _embedded(v)
    elif isinstance(obj, str) and obj.lstrip().startswith("{") and '"panels"' in obj:
        try:
            parsed = json.loads(obj)
        except ValueError:
            return
        yield from _embedded(parsed)


def dashboards_in(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(errors="replace")
    if "panels" not in text:  # cheap filter; escaped or block-quoted JSON still contains the word
        return []
    try:
        if path.suffix == ".json":
            docs = [json.loads(text)]
        elif path.suffix in (".yaml", ".yml"):
            docs = list(yaml.safe_load_all(text))
        else:
            return []
    except (ValueError, yaml.YAMLError):
        return []  # a Helm template ({{ .Files.Get ... }}) is not YAML until rendered: it loads the source
    return [d for doc in docs for d in _embedded(doc)]


def test_every_copy_of_the_dashboard_matches_the_source() -> None:
    source = dashboard()
    found = {}
    for path in repo_files():
        for d in dashboards_in(path):
            if d.get("uid") == source["uid"] or d.get("title") == source["title"]:
                found[path.relative_to(ROOT).as_posix()] = d
    assert SOURCE.relative_to(ROOT).as_posix() in found, "the source itself was not found: is it tracked or ignored?"
    drifted = sorted(p for p, d in found.items() if d != source)
    assert not drifted, (
        f"copies of the vramctl dashboard differ from {SOURCE.relative_to(ROOT)}: {drifted}; copy it again, or better, load the source"
    )


def test_compose_grafana_loads_the_single_source() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    for svc in (grafana, prometheus):
        assert svc["profiles"] == ["monitoring"]
        assert svc["network_mode"] == "host"  # never a bridge network
    mounts = {}
    for v in grafana["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            mounts[(COMPOSE.parent / src).resolve()] = dst
    assert mounts.get(SOURCE.parent.resolve()), f"grafana does not mount {SOURCE.parent.relative_to(ROOT)}: {grafana['volumes']}"
    assert mounts.get(PROVISIONING.resolve()) == "/etc/grafana/provisioning"

    providers = [p for f in sorted((PROVISIONING / "dashboards").glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["options"]["path"] for p in providers] == [mounts[SOURCE.parent.resolve()]]
    assert not list(PROVISIONING.rglob("*.json")), "no dashboard JSON in the provisioning folder: it is mounted from the chart"

    sources = [d for f in sorted((PROVISIONING / "datasources").glob("*.y*ml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    assert [d["type"] for d in sources] == ["prometheus"]
    listen = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--web.listen-address="))
    assert sources[0]["url"] == f"http://{listen}"

    prom = yaml.safe_load((ROOT / "compose" / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    vramctl_cmd = compose["services"]["vramctl"]["command"]
    assert targets == [vramctl_cmd[vramctl_cmd.index("--listen") + 1]] == ["127.0.0.1:9400"]


def panels() -> list[dict[str, Any]]:
    return dashboard()["panels"]  # type: ignore[no-any-return]


def test_panels_are_well_formed() -> None:
    ids = [p.get("id") for p in panels()]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), f"panel ids must be unique integers: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels():
        where = f"panel {p.get('id')} ({p.get('title')!r})"
        assert p.get("type") != "row", f"{where}: rows carry no query; this dashboard has none"
        assert p.get("title"), where
        assert p.get("datasource") == DATASOURCE, f"{where}: datasource must be {DATASOURCE}"
        g = p.get("gridPos") or {}
        assert all(isinstance(g.get(k), int) for k in "xywh"), f"{where}: gridPos needs integer x, y, w, h: {g}"
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, f"{where}: gridPos {g}"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{where} overlaps {cells[(x, y)]}"
                cells[(x, y)] = where
        targets = p.get("targets") or []
        assert targets, f"{where}: no targets"
        refs = [t.get("refId") for t in targets]
        assert len(refs) == len(set(refs)) and all(refs), f"{where}: refIds {refs}"
        for t in targets:
            assert t.get("datasource") == DATASOURCE, f"{where} {t.get('refId')}: target datasource"
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{where} {t.get('refId')}: no expr"


def test_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    gpu = variables["gpu"]
    assert gpu["type"] == "query" and gpu["datasource"] == DATASOURCE and "gpu)" in gpu["definition"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, v["name"]
    used = {m for p in panels() for t in p["targets"] for m in re.findall(r"\$\{?(\w+)", t["expr"])}
    for v in variables.values():
        used |= set(re.findall(r"\$\{?(\w+)", v.get("definition", "")))
    unknown = used - set(variables) - GRAFANA_BUILTINS
    assert not unknown, f"variables used but not defined: {sorted(unknown)}"
    assert {"gpu", "instance", "job"} <= used


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every sample name vramctl exports, from a live registry (DCGM set on,
    a probe reporting every optional field)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    rt = FakeRuntime(states={"llm": WorkloadState.RUNNING})
    d = spec()
    gpu = FakeGpu(rt, d, kind="nvml", utilization=0.5, temperature_celsius=60.0, power_watts=200.0)
    w = GpuWorker(d, rt, gpu, WorkerSettings(poll_interval_s=0.001, baseline_mib=0), metrics=metrics)
    w.reconcile_once()
    registry.register(VramctlCollector(lambda: [w], dcgm_compat=True))
    # Series that appear once the queue and the gateway have served something.
    gm = GatewayMetrics(registry)
    gm.requests.labels("0", "llm", "200").inc()
    gm.duration.labels("0", "llm").observe(0.1)
    gm.in_flight.labels("0", "llm").set(0)
    metrics.queue.wait.labels("0", "llm").observe(1.0)
    metrics.queue.holds.labels("0", "llm").set(0)
    metrics.sleep.residue.labels("0", "llm").set(0)  # once a model slept
    text = generate_latest(registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples} | {
        fam.name for fam in text_string_to_metric_families(text)
    }


def test_queries_name_only_exported_metrics(exported_names: set[str]) -> None:
    prometheus_own = {"up", "scrape_duration_seconds"}
    for p in panels():
        for t in p["targets"]:
            names = set(re.findall(r"\b(vramctl_\w+|DCGM_\w+)", t["expr"])) | (set(re.findall(r"\b(\w+)\{", t["expr"])) - {"by"})
            unknown = {n for n in names if n not in exported_names and n not in prometheus_own}
            assert not unknown, f"panel {p['id']} ({p['title']}) {t['refId']}: {sorted(unknown)} not exported"

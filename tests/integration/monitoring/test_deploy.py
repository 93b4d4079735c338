"""Offline validation of deploy/: Prometheus config and rules (promtool), alert unit tests,
the Grafana dashboard (structure + grafana-foundation-sdk round trip), docker compose (the
compose-spec JSON schema), Dockerfiles, Kubernetes manifests (kubernetes-validate's bundled
schemas; our own schema for the Prometheus Operator CRDs) and yamllint."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from monitoring import dashboard, exporter, gpu, metrics
from tests.integration.pipeline.harness import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed (./setup.sh installs it)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


# ----- Prometheus ---------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    result = _run(_tool("promtool"), "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    rules = sorted(str(p) for p in (DEPLOY / "prometheus/rules").glob("*.yml"))
    result = _run(_tool("promtool"), "check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    tests = sorted(str(p) for p in (DEPLOY / "prometheus/tests").glob("*.yml"))
    assert tests
    result = _run(_tool("promtool"), "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for name in ("recording.yml", "alerts.yml"):
        groups += yaml.safe_load((DEPLOY / "prometheus/rules" / name).read_text())["groups"]
    return groups


def test_every_alert_is_documented_and_unit_tested() -> None:
    alerts = [r["alert"] for g in _rule_groups() for r in g["rules"] if "alert" in r]
    assert {"SinkstreamWorkerDown", "SinkstreamLagGrowing", "SinkstreamDeadLettersRising",
            "SinkstreamGpuMemoryHigh", "SinkstreamStaleCommits"} <= set(alerts)
    docs = (ROOT / "docs/operations.md").read_text()
    tested = (DEPLOY / "prometheus/tests/alerts_test.yml").read_text()
    for alert in alerts:
        assert alert in docs, f"{alert} is not explained in docs/operations.md"
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool unit test"


# ----- metric names used by dashboard and rules exist -------------------------------------------
def _known_series() -> set[str]:
    metrics.init_worker("sinkkv", "m")
    names: set[str] = set()
    from prometheus_client import REGISTRY

    for family in REGISTRY.collect():
        names |= {s.name for s in family.samples}
    names |= {"up"}
    exporter_doc = exporter.__doc__ or ""
    names |= set(re.findall(r"``(sinkstream_[a-z_]+)", exporter_doc))
    names |= {"sinkstream_exporter_errors_total", "sinkstream_input_lag_age_seconds_bucket",
              "sinkstream_input_lag_age_seconds_gcount", "sinkstream_input_lag_age_seconds_gsum"}
    names |= set(re.findall(r"``(sinkstream_gpu_[a-z_]+)``", gpu.__doc__ or ""))
    names |= {r["record"] for g in _rule_groups() for r in g["rules"] if "record" in r}
    return names


def _exprs() -> list[str]:
    board = json.loads(dashboard.DASHBOARD_PATH.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [r["expr"] for g in _rule_groups() for r in g["rules"]]
    return exprs


def test_dashboard_and_rules_only_use_metrics_that_exist() -> None:
    known = _known_series()
    for expr in _exprs():
        for name in re.findall(r"\b((?:sinkstream|model|job):[a-z_:0-9]+|sinkstream_[a-z_0-9]+"
                               r"|process_[a-z_]+)\b", expr):
            assert name in known, f"{name} (in {expr!r}) is not exported by anything"


# ----- Grafana ------------------------------------------------------------------------------
def _board() -> dict[str, Any]:
    return dict(json.loads(dashboard.DASHBOARD_PATH.read_text()))


def test_committed_dashboard_is_the_generated_one() -> None:
    assert dashboard.DASHBOARD_PATH.read_text() == dashboard.render(), (
        "deploy/grafana/dashboards/sinkstream.json is stale: python -m monitoring.dashboard")


def test_dashboard_structure() -> None:
    board = _board()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "model", "instance"} <= set(variables)
    assert variables["instance"]["definition"].startswith("label_values(up{")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    titles = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= set(variables) | {"__rate_interval"}, (panel["title"], used)
    # what the issue asks the dashboard to show
    for needed in ("Tokens fed / s", "Batch feed latency", "Summary latency", "Unapplied input",
                   "Oldest unapplied entry age", "State size", "State I/O bytes / s",
                   "State load / save time (p95)", "Worker memory (RSS)", "GPU memory",
                   "Dead letters / s by reason", "Failures, stale commits, takeovers",
                   "Workers up"):
        assert needed in titles, needed


def test_dashboard_round_trips_through_grafana_foundation_sdk() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard as sdk
    from grafana_foundation_sdk.models import prometheus, stat, timeseries

    register_default_plugins()
    board = _board()
    model = sdk.Dashboard.from_json(board)
    again = json.loads(json.dumps(model, cls=JSONEncoder))
    assert again["uid"] == board["uid"] and again["title"] == board["title"]
    assert [v["name"] for v in again["templating"]["list"]] == \
        [v["name"] for v in board["templating"]["list"]]
    assert model.panels is not None and len(model.panels) == len(board["panels"])
    for typed, original, encoded in zip(model.panels, board["panels"], again["panels"],
                                        strict=True):
        assert encoded["title"] == original["title"]
        assert encoded["type"] == original["type"]
        assert encoded["gridPos"] == original["gridPos"]
        if original["type"] == "row":
            assert isinstance(typed, sdk.RowPanel)
            continue
        assert isinstance(typed, sdk.Panel)
        # typed decoding: known panel plugins and Prometheus queries, not opaque bags
        expected = stat.Options if original["type"] == "stat" else timeseries.Options
        assert isinstance(typed.options, expected), original["title"]
        assert typed.targets is not None
        assert all(isinstance(t, prometheus.Dataquery) for t in typed.targets)
        assert [(t["refId"], t["expr"], t["legendFormat"]) for t in encoded["targets"]] == \
            [(t["refId"], t["expr"], t["legendFormat"]) for t in original["targets"]]
        assert encoded["fieldConfig"]["defaults"]["unit"] == \
            original["fieldConfig"]["defaults"]["unit"]
        assert encoded["datasource"] == original["datasource"]


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/sinkstream.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ----- docker compose and images ------------------------------------------------------------
def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    tool = _tool("check-jsonschema")
    compose = DEPLOY / "docker-compose.yml"
    result = _run(tool, "--builtin-schema", "vendor.compose-spec", str(compose))
    assert result.returncode == 0, result.stdout + result.stderr
    # the schema really is enforced: a misspelt key fails
    broken = yaml.safe_load(compose.read_text())
    broken["services"]["redis"]["healthcheck"]["intervall"] = "10s"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert _run(tool, "--builtin-schema", "vendor.compose-spec", str(bad)).returncode != 0


def test_compose_semantics() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    gpus = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert len(gpus) >= 2
    device_ids = []
    for service in gpus.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        device_ids += device["device_ids"]
        assert service["profiles"] == ["gpu"]
        assert service["environment"]["SINKSTREAM_DEVICE"] == "cuda"
    assert len(set(device_ids)) == len(device_ids), "one worker process per GPU"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["exporter"]["command"][0] == "exporter"
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    prom = services["prometheus"]["volumes"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in prom


def test_dockerfiles() -> None:
    gpu_file = (DEPLOY / "Dockerfile").read_text()
    cpu_file = (DEPLOY / "Dockerfile.cpu").read_text()
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:\S+runtime", gpu_file, re.M)
    assert "whl/cpu" in cpu_file and "slim" in cpu_file
    for text in (gpu_file, cpu_file):
        assert "USER 10001" in text and "HEALTHCHECK" in text
        assert 'ENTRYPOINT ["sinkstream"]' in text
        for source in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


# ----- Kubernetes ---------------------------------------------------------------------------
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
    "targetLabel": {"type": "string"}, "replacement": {"type": "string"},
    "sourceLabels": {"type": "array", "items": {"type": "string"}},
    "regex": {"type": "string"}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "relabelings": {"type": "array", "items": _RELABEL}}}
_SELECTOR = {"type": "object", "required": ["matchLabels"],
             "properties": {"matchLabels": {"type": "object",
                                            "additionalProperties": {"type": "string"}}}}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                        "labels": {"type": "object"}}}
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False, "properties": {
    "record": {"type": "string"}, "alert": {"type": "string"}, "expr": {"type": "string"},
    "for": {"type": "string"}, "labels": {"type": "object"}, "annotations": {"type": "object"}},
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}]}
#: The subset of the Prometheus Operator CRDs (monitoring.coreos.com/v1) these manifests use.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {
                       "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": _META,
                       "spec": {"type": "object", "additionalProperties": False,
                                "required": ["selector", "podMetricsEndpoints"],
                                "properties": {"selector": _SELECTOR, "podMetricsEndpoints": {
                                    "type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
    "ServiceMonitor": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                       "properties": {
                           "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": _META,
                           "spec": {"type": "object", "additionalProperties": False,
                                    "required": ["selector", "endpoints"],
                                    "properties": {"selector": _SELECTOR, "endpoints": {
                                        "type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
    "PrometheusRule": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                       "properties": {
                           "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": _META,
                           "spec": {"type": "object", "required": ["groups"], "properties": {
                               "groups": {"type": "array", "items": {
                                   "type": "object", "required": ["name", "rules"],
                                   "properties": {"name": {"type": "string"}, "rules": {
                                       "type": "array", "items": _RULE}}}}}}}},
}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_kubernetes_manifests_validate_against_bundled_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    checked = set()
    for _name, doc in _manifests():
        if doc["kind"] in CRD_KINDS:
            continue
        kv.validate(doc, K8S_VERSION, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "PodDisruptionBudget", "Service", "ConfigMap", "Secret"} <= checked
    # strict validation really rejects a misspelt field
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_prometheus_operator_resources_validate_against_our_schema() -> None:
    kinds = set()
    for _name, doc in _manifests():
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            kinds.add(doc["kind"])
    assert kinds == CRD_KINDS
    rule = next(d for _, d in _manifests() if d["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == _rule_groups(), \
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules"
    jobs = {d["metadata"]["name"]: d["spec"].get("podMetricsEndpoints",
                                                 d["spec"].get("endpoints"))[0]
            ["relabelings"][0]["replacement"] for _, d in _manifests()
            if d["kind"] in ("PodMonitor", "ServiceMonitor")}
    assert jobs == {"sinkstream-workers": "sinkstream-workers",
                    "sinkstream-exporter": "sinkstream-exporter",
                    "sinkstream-gateway": "sinkstream-gateway"}


def _by_name(kind: str, name: str) -> dict[str, Any]:
    return next(d for _, d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_worker_semantics() -> None:
    worker = _by_name("Deployment", "sinkstream-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    env = {e["name"]: e for e in container["env"]}
    assert env["SINKSTREAM_REDIS_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "sinkstream-redis", "key": "SINKSTREAM_REDIS_URL"}
    config = _by_name("ConfigMap", "sinkstream-config")["data"]
    assert "SINKSTREAM_REDIS_URL" not in config
    # longer than a lease, a batch and a final summary
    assert pod["terminationGracePeriodSeconds"] > 10 * float(config["SINKSTREAM_LEASE_SECONDS"])
    assert config["SINKSTREAM_METRICS_HOST"] == "0.0.0.0"
    labels = worker["spec"]["template"]["metadata"]["labels"]
    pdb = _by_name("PodDisruptionBudget", "sinkstream-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = next(d for _, d in _manifests() if d["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    exporter_pod = _by_name("Deployment", "sinkstream-exporter")["spec"]
    assert exporter_pod["replicas"] == 1 and exporter_pod["strategy"]["type"] == "Recreate"
    service = _by_name("Service", "sinkstream-exporter")
    assert service["spec"]["selector"].items() <= \
        exporter_pod["template"]["metadata"]["labels"].items()


def test_kubernetes_gateway_semantics() -> None:
    """Probes on /healthz and /readyz, the tokens file from a Secret (hashes only) readable
    by the container's group, the Service and ServiceMonitor selecting its pods."""
    gateway = _by_name("Deployment", "sinkstream-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "serve"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    tokens_file = env["SINKSTREAM_GATEWAY_TOKENS_FILE"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tokens")
    assert tokens_file.startswith(mount["mountPath"]) and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tokens")
    assert volume["secret"]["secretName"] == "sinkstream-gateway-tokens"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    service = _by_name("Service", "sinkstream-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = _by_name("ServiceMonitor", "sinkstream-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_compose_gateway() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["command"][0] == "serve"
    assert all(p.startswith("127.0.0.1:") for p in gateway["ports"]), "loopback on the host"
    assert gateway["environment"]["SINKSTREAM_GATEWAY_TOKENS_FILE"] == \
        "/run/secrets/gateway-tokens"
    tokens = DEPLOY / compose["secrets"]["gateway-tokens"]["file"]
    assert json.loads(tokens.read_text())["tokens"] == [], "ship no token, not even a hash"
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert targets["sinkstream-gateway"]["static_configs"][0]["targets"] == ["gateway:8080"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {
        "kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def test_yamllint() -> None:
    result = _run(_tool("yamllint"), "-c", str(DEPLOY / ".yamllint.yml"), "-s", str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr

"""Every dashboard query against a REAL Prometheus scraping a real worker and the exporter.

A private redis-server, one ``sinkstream worker`` subprocess (tiny model, rolling summaries,
no hot cache so state loads happen), ``sinkstream exporter``, and ``prometheus`` with the
project's recording and alerting rules, all on loopback. The run publishes a short meeting
with a malformed entry (dead letter) and an end-of-stream marker (final summary), a stream
with a corrupt state (failure), and a stream held by a hung worker (its lease outlives the
test, so neither its own task nor another task's batch may claim it: its input stays unapplied,
lag). Then each panel's PromQL must parse and return
data; GPU panels may be empty only where no CUDA device was initialised.

Set DASHBOARD_VALUES_JSON=/path.json to keep the values Prometheus returned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from monitoring import dashboard
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.store import CommitRequest, StateStore
from tests.integration.pipeline.harness import (
    ROOT,
    WorkerPool,
    meta,
    settings_from_env,
    wait_until,
    worker_env,
)

RULES = ROOT / "deploy" / "prometheus" / "rules"
RATE_INTERVAL = "1m"
TURNS = [
    ("Alice", "Good morning. Today we review the launch checklist for Friday."),
    ("Bob", "The crash on startup is fixed; the patch is in review."),
    ("Carol", "Docs are ready except the migration guide, I will finish it tomorrow."),
    ("Alice", "Marketing wants the announcement at nine. Any objections?"),
    ("Bob", "None from engineering, as long as the rollback plan is signed off."),
    ("Carol", "I will write the rollback plan tonight and send it to Alice."),
    ("Alice", "Good. Bob owns the crash fix, Carol owns docs and rollback."),
    ("Bob", "One more thing: the load test showed p99 latency at two hundred ms."),
    ("Carol", "That is within budget. Let us keep an eye on it after launch."),
    ("Alice", "Agreed. Anything else? No? Then we ship on Friday."),
]


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus is not installed (./setup.sh: apt-get install prometheus)")
    return found


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as exc:  # 400: does not parse; 503: still starting
            body = exc.read().decode(errors="replace")
            try:
                return dict(json.loads(body))
            except ValueError:
                return {"status": "error", "error": f"HTTP {exc.code}: {body[:200]}"}

    def result(self, expr: str) -> list[dict[str, Any]]:
        reply = self.query(expr)
        assert reply["status"] == "success", (expr, reply)
        return list(reply["data"]["result"])

    def value(self, expr: str) -> float | None:
        try:
            rows = self.result(expr)
        except (OSError, AssertionError, ValueError):
            return None
        return float(rows[0]["value"][1]) if rows else None


def _start_prometheus(tmp: Path, port: int, worker_port: int, exporter_port: int
                      ) -> subprocess.Popen[bytes]:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "recording.yml"), str(RULES / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "sinkstream-workers",
             "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
            {"job_name": "sinkstream-exporter",
             "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = (tmp / "prometheus.log").open("wb")
    return subprocess.Popen(
        [_prometheus_binary(), f"--config.file={path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
         "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$model", ".*").replace("$instance", ".*"))


def _publish(client: redis.Redis, env: dict[str, str]) -> None:
    producer = Producer(client, settings=settings_from_env(env))
    # corrupt state: the worker marks the stream failed (a failure series)
    lease = LeaseManager(client).acquire("broken", "vandal", 5)
    assert lease is not None
    StateStore(client).commit(CommitRequest("broken", lease.token, 0, "0-1",
                                            state=b"SNKSTATE but not really a state"))
    LeaseManager(client).release(lease)
    producer.publish_many("broken", [("hello", "A", None)])
    # a hung worker holds "stuck" (a lease that outlives the test): no task, and no batching
    # worker looking for companions, may claim it, so its input stays unapplied -> lag
    assert LeaseManager(client).acquire("stuck", "hung-worker", 3600) is not None
    producer.publish_many("stuck", [(f"waiting {i}", "D", None) for i in range(3)])
    # the meeting, with one malformed entry (no text: dead letter), then end of stream
    producer.publish_many("meeting", [(text, who, None) for who, text in TURNS[:5]])
    client.xadd(StreamKeys.of("meeting").input, {"speaker": "E"})
    producer.publish_many("meeting", [(text, who, None) for who, text in TURNS[5:]], eos=True)


@pytest.mark.timeout(240)
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    _prometheus_binary()
    worker_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    env = worker_env(
        redis_server.url, tmp_path, SINKSTREAM_METRICS_PORT=str(worker_port),
        SINKSTREAM_METRICS_HOST="127.0.0.1", SINKSTREAM_SUMMARY_EVERY_TOKENS="48",
        SINKSTREAM_SUMMARY_MAX_NEW_TOKENS="6", SINKSTREAM_HOT_CACHE_BYTES="0",
        SINKSTREAM_TRIM_APPLIED_INPUT="true",
    )
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    exporter_log = (tmp_path / "exporter.log").open("wb")
    exporter: subprocess.Popen[bytes] | None = None
    prom_proc: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        pool.start("w1")
        exporter = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "exporter", "--interval", "1", "--top-k", "5"],
            env={**env, "SINKSTREAM_METRICS_PORT": str(exporter_port)}, cwd=ROOT,
            stdout=exporter_log, stderr=subprocess.STDOUT, start_new_session=True)
        prom_proc = _start_prometheus(tmp_path, prom_port, worker_port, exporter_port)
        prom = Prom(prom_port)

        def logs() -> str:
            prom_log = (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:]
            exp_log = (tmp_path / "exporter.log").read_text(errors="replace")[-2000:]
            return f"{pool.logs()}\n--- exporter\n{exp_log}\n--- prometheus\n{prom_log}"

        # both targets up, and the worker's model-labelled series (created at zero once the
        # model is loaded) scraped before any input arrives, so rate() sees every increase
        wait_until(lambda: prom.value('count(up{job=~"sinkstream-.*"} == 1)') == 2, 90,
                   "Prometheus to scrape the worker and the exporter", logs)
        wait_until(lambda: prom.value("count(sinkstream_tokens_fed_total)") == 1, 90,
                   "the worker to load its model", logs)

        _publish(client, env)
        # (applied input is trimmed, so the final summary is the sign the meeting is done)
        def final_published() -> bool:
            entries: Any = client.xrange(StreamKeys.of("meeting").output)
            return any(fields.get(b"kind") == b"final" for _, fields in entries)

        wait_until(final_published, 120,
            "the worker to apply the meeting and publish its final summary", logs)
        wait_until(lambda: meta(client, "broken").get("status") == "failed", 30,
                   "the corrupt stream to be marked failed", logs)
        # the latest numbers scraped, the exporter's lag and the recording rule evaluated
        seen = {  # expression -> lowest value that means "scraped/evaluated after the run"
            "sum(sinkstream_dead_letters_total)": 1,
            'max(sinkstream_streams{status="failed"})': 1,
            "max(sinkstream_input_lag_entries)": 3,
            "sum(model:sinkstream_tokens_fed:rate1m)": 1e-9,
            "sum(sinkstream_summary_seconds_count)": 2,
        }
        exact = {"max(sinkstream_input_lag_entries)"}  # only "stuck" lags once all is applied
        wait_until(lambda: all((prom.value(e) or 0) >= v if e not in exact else
                               prom.value(e) == v for e, v in seen.items()), 60,
                   "Prometheus to see the run",
                   lambda: f"{ {e: prom.value(e) for e in seen} }\n{logs()}")

        cuda = prom.value("count(sinkstream_gpu_memory_total_bytes)") is not None
        record = _run_dashboard(prom, cuda)
        record["template_variables"] = _check_variables(prom)
        record["seconds"] = round(time.monotonic() - started, 1)
        out = os.environ.get("DASHBOARD_VALUES_JSON")
        (Path(out) if out else tmp_path / "dashboard-values.json").write_text(
            json.dumps(record, indent=2))

        values = {(p["panel"], t["refId"]): t for p in record["panels"] for t in p["targets"]}
        assert values[("Workers up", "A")]["values"][0]["value"] == 1
        assert values[("Workers up", "B")]["values"][0]["value"] == 1  # its heartbeat
        assert values[("Tokens fed / s", "A")]["values"][0]["value"] > 0
        assert values[("Unapplied input", "A")]["values"][0]["value"] == 3
        assert values[("Oldest unapplied entry age", "A")]["values"][0]["value"] > 0
        assert values[("Dead letters / s by reason", "B")]["values"][0]["value"] >= 1
        assert values[("Worker memory (RSS)", "A")]["values"][0]["value"] > 50e6
        assert values[("State size", "A")]["values"][0]["value"] > 0
        failed_now = values[("Failures, stale commits, takeovers", "D")]["values"]
        assert failed_now[0]["value"] == 1
    finally:
        _stop(prom_proc)
        _stop(exporter)
        pool.close()


def _run_dashboard(prom: Prom, cuda: bool) -> dict[str, Any]:
    board = json.loads(dashboard.DASHBOARD_PATH.read_text())
    panels = []
    problems = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        gpu_only = "gpu" in panel.get("tags", [])
        targets = []
        for target in panel["targets"]:
            expr = _substitute(target["expr"])
            reply = prom.query(expr)
            if reply.get("status") != "success":
                problems.append(f"{panel['title']} {target['refId']}: {reply.get('error')}")
                continue
            rows = reply["data"]["result"]
            if not rows and not (gpu_only and not cuda):
                problems.append(f"{panel['title']} {target['refId']}: no data for {expr}")
            targets.append({
                "refId": target["refId"], "expr": target["expr"], "legend": target["legendFormat"],
                "values": [{"labels": {k: v for k, v in row["metric"].items()
                                       if k not in ("job",)},
                            "value": float(row["value"][1])} for row in rows],
                "empty_because": "no CUDA device on this machine" if not rows else None,
            })
        panels.append({"panel": panel["title"], "type": panel["type"], "targets": targets})
    assert not problems, "\n".join(problems)
    return {"panels": panels, "cuda": cuda}


def _check_variables(prom: Prom) -> dict[str, list[str]]:
    """Grafana's label_values(metric, label) is ``group by (label) (metric)`` in PromQL."""
    board = json.loads(dashboard.DASHBOARD_PATH.read_text())
    found = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        inner = variable["definition"][len("label_values("):-1]
        metric, _, label = inner.rpartition(",")
        rows = prom.result(f"group by ({label.strip()}) ({metric.strip()})")
        found[variable["name"]] = sorted(r["metric"][label.strip()] for r in rows)
        assert found[variable["name"]], variable["definition"]
    return found

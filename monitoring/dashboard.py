"""The Grafana dashboard, as code: ``python -m monitoring.dashboard [PATH]``.

Writes ``deploy/grafana/dashboards/sinkstream.json`` (the file Grafana provisions). Plain
dicts, no Grafana dependency; the tests check that the committed file equals this output,
round-trip it through ``grafana-foundation-sdk``'s typed models, and run every query below
against a real Prometheus scraping a real worker and exporter.

Template variables: ``datasource`` (a Prometheus data source), ``model`` and ``instance``
(worker scrape targets), both multi-value with "All" = ``.*``. Worker series are filtered by
them; exporter series (lag, stream counts, Redis) are fleet-wide and use ``max()`` so a
briefly doubled exporter during a rollout does not double the numbers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "dashboards" / "sinkstream.json"
UID = "sinkstream-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
WORKERS = 'job="sinkstream-workers"'
W = 'instance=~"$instance"'  # worker filter
WM = 'model=~"$model", instance=~"$instance"'  # worker + model filter
RI = "$__rate_interval"


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 8
    height: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def _quantiles(metric: str, selector: str, by: str = "") -> list[Target]:
    group = f"le{', ' + by if by else ''}"
    return [
        Target(f"histogram_quantile({q}, sum by ({group}) "
               f"(rate({metric}_bucket{{{selector}}}[{RI}])))", f"p{int(q * 100)}"
               + (f" {{{{{by}}}}}" if by else ""))
        for q in (0.5, 0.95, 0.99)
    ]


ROWS: list[tuple[str, list[Panel]]] = [
    ("Throughput", [
        Panel("Workers up", [Target(f"count(up{{{WORKERS}}} == 1)", "workers"),
                             Target("max(sinkstream_workers_live)", "live in Redis")],
              kind="stat", width=4, height=5,
              description="Worker processes Prometheus scrapes successfully (one per GPU), "
                          "and task slots with a live heartbeat in Redis (what cross-stream "
                          "batching shares the runnable streams among); fewer scraped than "
                          "live: Prometheus misses some workers."),
        Panel("Tokens / s (1m, recorded)",
              [Target('sum by (model) (model:sinkstream_tokens_fed:rate1m{model=~"$model"})',
                      "{{model}}")], kind="stat", width=4, height=5,
              description="Recording rule model:sinkstream_tokens_fed:rate1m, all workers."),
        Panel("Streams by status", [Target("max by (status) (sinkstream_streams)",
                                           "{{status}}")], kind="stat", width=8, height=5,
              description="From the exporter: active = unapplied input or a lease held."),
        Panel("Worker streams active", [Target(f"sinkstream_worker_streams_active{{{W}}}",
                                               "{{instance}}")], width=8, height=5,
              description="Distinct streams each worker applied a batch to in the last minute."),
        Panel("Tokens fed / s", [Target(
            f"sum by (model) (rate(sinkstream_tokens_fed_total{{{WM}}}[{RI}]))", "{{model}}")],
            description="Input tokens fed into stream states."),
        Panel("Summary tokens / s", [Target(
            f"sum by (kind) (rate(sinkstream_summary_tokens_total{{{WM}}}[{RI}]))", "{{kind}}")],
            description="Tokens generated for rolling, final and on-demand summaries, answers."),
        Panel("Batches / s by outcome", [Target(
            f"sum by (outcome) (rate(sinkstream_batches_total{{{W}}}[{RI}]))", "{{outcome}}")],
            unit="ops"),
    ]),
    ("Latency", [
        Panel("Batch feed latency", _quantiles("sinkstream_batch_feed_seconds", WM), unit="s",
              description="Model time to feed one batch of one stream."),
        Panel("Summary latency", _quantiles("sinkstream_summary_seconds", WM), unit="s",
              description="Time to generate one summary or answer."),
        Panel("State load / save time (p95)", [
            Target("histogram_quantile(0.95, sum by (le) "
                   f"(rate(sinkstream_state_load_seconds_bucket{{{W}}}[{RI}])))", "load p95"),
            Target("histogram_quantile(0.95, sum by (le) "
                   f"(rate(sinkstream_state_save_seconds_bucket{{{W}}}[{RI}])))", "save p95"),
        ], unit="s", description="Load: Redis download + decode (hot-cache misses only). "
                                 "Save: encode + fenced commit."),
    ]),
    ("Lag", [
        Panel("Unapplied input", [
            Target("max(sinkstream_input_lag_entries)", "entries"),
            Target("max(sinkstream_input_lagging_streams)", "streams lagging"),
        ], description="Entries published but not yet committed into a state (failed streams "
                       "excluded), from the exporter."),
        Panel("Oldest unapplied entry age", [
            Target("max(sinkstream_input_oldest_unapplied_age_seconds)", "oldest"),
            Target("histogram_quantile(0.9, max by (le) (sinkstream_input_lag_age_seconds_bucket))",
                   "p90 of lagging streams"),
        ], unit="s", description="How far behind the furthest stream is, and the typical "
                                 "lagging stream."),
        Panel("Dead letters / s by reason", [Target(
            f"sum by (reason) (rate(sinkstream_dead_letters_total{{{W}}}[{RI}]))", "{{reason}}"),
            Target("max(sinkstream_dead_letter_entries)", "stored (all streams)"),
        ], description="Input entries rejected by workers (bad producer input); the stored "
                       "count is the total length of the dead-letter streams."),
        Panel("Failures, stale commits, takeovers", [
            Target(f"sum by (reason) (increase(sinkstream_stream_failures_total{{{W}}}[{RI}]))",
                   "failed: {{reason}}"),
            Target("sum by (reason) "
                   f"(increase(sinkstream_stale_commits_refused_total{{{W}}}[{RI}]))",
                   "stale commit: {{reason}}"),
            Target(f"sum(increase(sinkstream_leases_taken_over_total{{{W}}}[{RI}]))",
                   "leases taken over"),
            Target('max(sinkstream_streams{status="failed"})', "streams failed now"),
        ], width=16),
    ]),
    ("Notes and memory", [
        Panel("Guard: generated sentences / s", [Target(
            f"sum by (action, reason) (rate(sinkstream_guard_sentences_total{{{W}}}[{RI}]))",
            "{{action}} {{reason}}")], unit="ops",
            description="Sentences the faithfulness guard checked: kept, repaired (a misspelt "
                        "name) or dropped (a name, number, date or time not in what the "
                        "sentence rests on). A rising drop rate means the model invents."),
        Panel("Chunk embeddings", [
            Target(f"sum(rate(sinkstream_memory_vectors_total{{{W}}}[{RI}]))", "embedded / s"),
            Target(f"sum(sinkstream_memory_vectors_pending{{{W}}})", "waiting"),
        ], description="Retrieval chunks embedded off the feed path, once they leave the "
                       "window, and the vectorizers' backlog."),
        Panel("Redis round trips per batch", [Target(
            f"sum by (source) (rate(sinkstream_redis_round_trips_total{{{W}}}[{RI}])) / "
            f"scalar(clamp_min(sum(rate(sinkstream_batches_total{{{W}}}[{RI}])), 1e-9))",
            "{{source}}")],
            description="Commands and pipelines sent to the data Redis per batch, by who sent "
                        "them: the tasks (4 for a batch on a hot state), the dispatcher, lease "
                        "renewals, the vectorizer."),
    ]),
    ("Log streams", [
        Panel("Log lines / s by level", [Target(
            f"sum by (level) (rate(sinkstream_log_lines_total{{{W}}}[{RI}]))", "{{level}}")],
            unit="ops", description="Log lines mined into templates (docs/logs.md), all "
                                    "streams; a rising error/fatal share is the signal."),
        Panel("New templates and bursts / s", [
            Target(f"sum(rate(sinkstream_log_templates_new_total{{{W}}}[{RI}]))",
                   "new templates"),
            Target(f"sum(rate(sinkstream_log_bursts_total{{{W}}}[{RI}]))", "bursts"),
        ], unit="ops", description="Templates seen for the first time in their stream, and "
                                   "bursts (a template far above its own baseline)."),
    ]),
    ("State and memory", [
        Panel("State size", [
            Target(f"max by (model) (sinkstream_state_size_bytes{{{WM}}})",
                   "last committed {{model}}"),
            Target("max(sinkstream_state_stored_bytes)", "stored in Redis (all streams)"),
        ], unit="bytes"),
        Panel("State I/O bytes / s", [
            Target(f"sum(rate(sinkstream_state_load_bytes_sum{{{W}}}[{RI}]))", "loaded"),
            Target(f"sum(rate(sinkstream_state_save_bytes_sum{{{W}}}[{RI}]))", "saved"),
        ], unit="Bps"),
        Panel("Hot cache", [
            Target(f"sum(rate(sinkstream_hot_cache_hits_total{{{W}}}[{RI}])) / clamp_min("
                   f"sum(rate(sinkstream_hot_cache_hits_total{{{W}}}[{RI}])) + "
                   f"sum(rate(sinkstream_hot_cache_misses_total{{{W}}}[{RI}])), 1e-9)",
                   "hit ratio"),
        ], unit="percentunit", description="Batches that reused an in-memory state."),
        Panel("Worker memory (RSS)", [Target(
            f"process_resident_memory_bytes{{{WORKERS}, {W}}}", "{{instance}}"),
            Target(f"sinkstream_hot_cache_bytes{{{W}}}", "hot cache {{instance}}")],
            unit="bytes"),
        Panel("GPU memory", [
            Target(f"sinkstream_gpu_memory_allocated_bytes{{{W}}}",
                   "allocated {{instance}} {{device}}"),
            Target(f"sinkstream_gpu_memory_reserved_bytes{{{W}}}",
                   "reserved {{instance}} {{device}}"),
            Target(f"sinkstream_gpu_memory_used_bytes{{{W}}}", "used {{instance}} {{device}}"),
            Target(f"sinkstream_gpu_memory_total_bytes{{{W}}}", "total {{instance}} {{device}}"),
        ], unit="bytes", extra={"gpu_only": True},
            description="Per CUDA device of each worker; empty on CPU workers."),
        Panel("Redis memory", [
            Target("max(sinkstream_redis_memory_used_bytes)", "used"),
            Target("max(sinkstream_redis_memory_max_bytes)", "maxmemory (0 = none)"),
        ], unit="bytes", description="From INFO memory, via the exporter."),
        Panel("Exporter", [
            Target("max(sinkstream_exporter_redis_up)", "redis up"),
            Target("time() - max(sinkstream_exporter_last_success_timestamp_seconds)",
                   "seconds since last pass"),
            Target("max(sinkstream_exporter_cycle_seconds)", "pass duration s"),
        ], width=16),
    ]),
]


def _options(kind: str) -> dict[str, Any]:
    if kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
            "orientation": "auto", "textMode": "auto",
        }
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True,
                   "calcs": []},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "sort": 1, "hide": 0,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for spec in row_panels:
            if x + spec.width > 24:
                x, y = 0, y + row_height
                row_height = 0
            panel: dict[str, Any] = {
                "id": next_id, "type": spec.kind, "title": spec.title,
                "description": spec.description, "datasource": DS,
                "gridPos": {"h": spec.height, "w": spec.width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": spec.unit}, "overrides": []},
                "options": _options(spec.kind),
                "targets": [
                    {"datasource": DS, "refId": chr(ord("A") + i), "expr": t.expr,
                     "legendFormat": t.legend or "__auto", "range": True, "editorMode": "code"}
                    for i, t in enumerate(spec.targets)
                ],
            }
            if spec.extra.get("gpu_only"):
                panel["tags"] = ["gpu"]
            panels.append(panel)
            next_id += 1
            x += spec.width
            row_height = max(row_height, spec.height)
        y += row_height
    return {
        "uid": UID, "title": "sinkstream", "description":
        "Tokens/s, latency, input lag, state sizes and I/O, memory, dead letters and failures "
        "of sinkstream workers (see docs/operations.md).",
        "tags": ["sinkstream"], "timezone": "browser", "editable": True,
        "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"}, "fiscalYearStartMonth": 0, "liveNow": False,
        "style": "dark", "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {"selected": False, "text": "Prometheus",
                                                "value": "prometheus"},
             "options": [], "refresh": 1, "hide": 0, "includeAll": False, "multi": False},
            _variable("model", "Model", "label_values(sinkstream_worker_info, model)"),
            _variable("instance", "Worker",
                      'label_values(up{job="sinkstream-workers"}, instance)'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DASHBOARD_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``sinkstream worker`` and ``sinkstream exporter``: the long-running processes."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sinkstream.cli.common import connect_redis, fail, settings


def worker_cmd(
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    name: Annotated[str | None, typer.Option(help="worker node name")] = None,
) -> None:
    """Run one worker process (solo pool: one process per GPU; start more for more GPUs).

    Wraps `celery -A workers.app worker` with the defaults sinkstream needs: solo pool,
    prefetch 1, late acks, the sinkstream queue. Serves /metrics on
    SINKSTREAM_METRICS_HOST:SINKSTREAM_METRICS_PORT. Ctrl-C / SIGTERM finish the batch in
    flight (it commits or is dropped whole) and stop.
    """
    cfg = settings()  # fail early, with a readable message, on invalid settings
    from workers.app import create_app

    node = name or f"sinkstream-{os.getpid()}@%h"
    create_app(cfg).worker_main([
        "worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1",
        "-Q", cfg.broker_queue,
        f"--loglevel={loglevel}", "-n", node, "--without-gossip", "--without-mingle",
        "--without-heartbeat",
    ])


def exporter_cmd(
    interval: Annotated[float, typer.Option(
        help="seconds between passes over Redis", envvar="SINKSTREAM_EXPORTER_INTERVAL",
        min=0.1)] = 10.0,
    top_k: Annotated[int, typer.Option(
        "--top-k", help="also export the K most lagging streams with a stream label (0: none)",
        envvar="SINKSTREAM_EXPORTER_TOP_K", min=0, max=100)] = 0,
    max_streams: Annotated[int, typer.Option(
        help="read at most this many registered streams (most recently active first)",
        envvar="SINKSTREAM_EXPORTER_MAX_STREAMS", min=1)] = 100_000,
    count_cap: Annotated[int, typer.Option(
        help="count at most this many unapplied entries per stream (untrimmed input only)",
        min=1)] = 10_000,
    once: Annotated[bool, typer.Option("--once", help="print the metrics once and exit")] = False,
) -> None:
    """Export input lag and stream health from Redis on /metrics, with or without workers.

    Serves SINKSTREAM_METRICS_HOST:SINKSTREAM_METRICS_PORT. Run one per Redis. Every
    INTERVAL seconds it reads each registered stream's committed entry id and unapplied input
    (one pipelined, bounded script per stream) and exports totals, the oldest unapplied age, a
    per-stream age histogram, stream counts by status, stored state bytes and dead letters.
    """
    from monitoring.exporter import render_once, run_exporter

    cfg = settings()
    if once:
        client = connect_redis(cfg)
        typer.echo(render_once(client, top_k=top_k, max_streams=max_streams,
                               count_cap=count_cap).decode(), nl=False)
        return
    if cfg.metrics_port == 0:
        raise fail("the exporter needs a port: set SINKSTREAM_METRICS_PORT (0 disables it)")
    from state_store.connection import redis_from_settings

    client = redis_from_settings(cfg, client_name="sinkstream-exporter")
    try:
        run_exporter(client, cfg.metrics_host, cfg.metrics_port, interval_s=interval,
                     top_k=top_k, max_streams=max_streams, count_cap=count_cap)
    except OSError as exc:
        raise fail(f"cannot serve /metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc}") \
            from None

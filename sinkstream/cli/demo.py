"""``sinkstream demo``: everything on one machine, a meeting replayed live, notes printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sinkstream.cli.common import console, fail, settings
from sinkstream.cli.reading import print_output, read_outputs
from sinkstream.settings import Settings

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "launch-review.vtt"


def demo_cmd(
    file: Annotated[Path | None, typer.Option(help="VTT/SRT/JSONL/QMSum/text transcript")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="format of --file")] = None,
    speed: Annotated[float, typer.Option(help="replay speed, x real time")] = 8.0,
    model: Annotated[str | None, typer.Option(help="model spec (default from settings)")] = None,
    summary_every: Annotated[int, typer.Option(help="tokens between rolling summaries")] = 256,
    stream: Annotated[str, typer.Option(help="stream id")] = "demo",
) -> None:
    """Run everything locally: a transcript replayed live, summaries as they arrive.

    Starts a private Redis and one worker, replays the transcript (the embedded sample by
    default) and prints the summaries as they arrive. Ctrl-C stops and cleans up."""
    from producer.formats import read_file
    from sinkstream.cli.localredis import RedisServer, free_port

    cfg = settings()
    _check_model_prepared(model or cfg.model, cfg)
    source = file or SAMPLE
    try:
        turns = read_file(source, fmt)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {source}: {exc}") from None
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-demo-"))
    server = RedisServer(workdir / "redis")
    metrics_port = free_port()
    env = {**os.environ, "SINKSTREAM_REDIS_URL": server.url, "SINKSTREAM_BROKER_URL": server.url,
           "SINKSTREAM_MODEL": model or cfg.model, "SINKSTREAM_METRICS_PORT": str(metrics_port),
           "SINKSTREAM_SUMMARY_EVERY_TOKENS": str(summary_every),
           "SINKSTREAM_DISPATCH_INTERVAL_SECONDS": "0.1",
           # one stream: nothing to batch it with, so no batch-invariance check at start
           "SINKSTREAM_BATCH_STREAMS": "1"}
    worker: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        console.print(f"[bold]redis[/] {server.url}  (private, in {workdir})")
        log_path = workdir / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "worker", "--loglevel", "WARNING"],
            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.print(f"[bold]worker[/] pid {worker.pid}, model {env['SINKSTREAM_MODEL']}, "
                      f"log {log_path}")
        console.print(f"[bold]metrics[/] http://127.0.0.1:{metrics_port}/metrics")
        _wait_for_worker(metrics_port, worker, log_path)
        demo_settings = Settings(redis_url=server.url)
        _run_demo(demo_settings, stream, turns, speed, source.name)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: cleaning up[/]")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        server.stop()


def _check_model_prepared(spec: str, cfg: Settings) -> None:
    """Refuse at once a preset that is not prepared: the worker would fail to load it, and
    the demo wait for a ready signal that never comes."""
    from workers.engines.loading import ModelSpecError, find_preset, parse_spec, preset_ready

    try:
        parsed = parse_spec(spec)
    except ModelSpecError as exc:
        raise fail(str(exc)) from None
    preset = find_preset(parsed.name) if parsed.kind == "preset" else None
    if preset is not None and not preset_ready(preset, cfg.model_cache_dir):
        raise fail(f"model {preset.name} is not prepared: run `sinkstream model prepare "
                   f"{preset.name}` first (once; downloads "
                   f"{preset.download_bytes / 1e9:.1f} GB)")


def _wait_for_worker(port: int, worker: subprocess.Popen[bytes], log_path: Path) -> None:
    """The worker serves /metrics once it is ready (model loaded)."""
    import urllib.request

    with console.status("starting the worker and loading the model..."):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise fail(f"the worker exited with {worker.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
    raise fail(f"the worker did not start in time; see {log_path}")


def _run_demo(cfg: Settings, stream: str, turns: list[Any], speed: float, name: str) -> None:
    from producer.publisher import Producer
    from producer.replay import replay

    client = redis.Redis.from_url(cfg.redis_url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with Progress(TextColumn("[bold]replaying[/] " + name), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                          transient=True) as progress:
                task = progress.add_task("turns", total=len(turns))
                producer = Producer(settings=cfg)
                replay(producer, stream, turns, realtime=True, speed=speed, eos=True,
                       on_progress=lambda n: progress.advance(task, n))
            console.print(f"[dim]published {len(turns)} turns and the end-of-stream marker[/]")
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            stop.set()
        finally:
            # the final summary may take a while on a CPU; give up 10 minutes after the end
            threading.Timer(600, stop.set).start()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        for _, fields in read_outputs(client, stream, from_start=True, stop=stop):
            print_output(fields)
            if fields.get("kind") == "final":
                break
    finally:
        stop.set()
    if errors:
        raise fail(f"publishing failed: {errors[0]}")
    console.print(f"[bold green]done.[/] Try: sinkstream status {stream}")

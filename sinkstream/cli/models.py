"""``sinkstream model ...``: prepare and inspect the model a worker serves."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from sinkstream.cli.common import console, err_console, settings
from workers.engines.loading.presets import preset_names

model_app = typer.Typer(
    help="Prepare and inspect the model (SINKSTREAM_MODEL; default: smollm2).",
    no_args_is_help=True,
)

_SPEC_HELP = (
    f"{' | '.join(preset_names())} (presets: sinkstream model list) | /path/to/hf-dir | "
    "/path/to/model.gguf | rwkv:/path/model.pth | "
    "tiny-llama[:seed], tiny-rwkv[:seed], one tiny-FAMILY per architecture (tiny-gemma3, "
    "tiny-mpt, ...) | ORG/NAME (hub); default: the model setting"
)


def _model_error(exc: Exception) -> typer.Exit:
    """Like ``fail`` but unwrapped and unformatted: model errors carry a list of valid specs."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(1)


@model_app.command("prepare")
def model_prepare(
    spec: Annotated[str | None, typer.Argument(help=_SPEC_HELP, show_default=False)] = None,
) -> None:
    """Convert and cache the model once (GGUF -> safetensors), so workers start in a second.

    Idempotent: a second run finds the cache and says so.
    """
    from workers.engines.base import EngineError
    from workers.engines.loading import prepare_model

    cfg = settings()
    text = spec if spec is not None else cfg.model
    try:
        with _PrepareProgress() as progress:
            prepared = prepare_model(text, cfg, progress.step)
    except EngineError as exc:
        raise _model_error(exc) from None
    where, took = prepared.directory, f"{prepared.seconds:.1f} s"
    message = {
        "converted": f"converted into {where} ({took})",
        "cached": f"already cached in {where} ({took})",
        "in-place": f"nothing to prepare: loads from {where} in place",
        "written": f"tiny checkpoint ready at {where} ({took})",
        "fetched": f"fetched {where} into the Hugging Face cache ({took})",
        "seeded": "nothing to prepare: tiny models are built from their seed at load",
    }.get(prepared.action, f"ready at {where} ({took})")
    console.print(f"{text}: {message}", soft_wrap=True)
    if prepared.action == "cached" and prepared.info.get("convert_seconds"):
        console.print(f"  (the conversion took {prepared.info['convert_seconds']:.1f} s)")
    steps = [f"{key.removesuffix('_seconds')} {prepared.info[key]:.1f} s"
             for key in ("download_seconds", "assemble_seconds", "convert_seconds")
             if prepared.action == "converted" and key in prepared.info]
    if steps:
        console.print(f"  ({', '.join(steps)})")


class _PrepareProgress:
    """Rich progress bars for the steps of a preset's preparation (download, join, verify,
    convert); a model with no such steps shows nothing."""

    _LABELS = {"download": "downloading parts", "assemble": "joining parts",
               "verify": "verifying sha256", "convert": "converting to safetensors"}

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=err_console, transient=False)
        self._tasks: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> _PrepareProgress:
        return self

    def __exit__(self, *_: object) -> None:
        if self._tasks:
            self._progress.stop()

    def step(self, name: str, done: int, total: int) -> None:
        from rich.progress import TaskID

        if not self._tasks:
            self._progress.start()
        if name not in self._tasks:
            scale = 2**20 if total > 10_000 else 1  # bytes shown in MiB, parts as counts
            self._tasks[name] = (self._progress.add_task(
                self._LABELS.get(name, name) + (" (MiB)" if scale > 1 else ""),
                total=total // scale), scale)
        task, scale = self._tasks[name]
        self._progress.update(TaskID(task), completed=done // scale)


@model_app.command("list")
def model_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The named model presets, whether each is ready here, and how to prepare it."""
    import json

    from sinkstream.settings import Settings
    from workers.engines.loading import PRESETS, model_dtype, parse_spec, preset_ready

    cfg = settings()
    default = Settings.model_fields["model"].default
    rows = [{"name": p.name, "model": p.display_name,
             "dtype": model_dtype(parse_spec(p.name), cfg),
             "download_gb": round(p.download_bytes / 1e9, 2), "license": p.license,
             "ready": preset_ready(p, cfg.model_cache_dir), "default": p.name == default,
             "description": p.description} for p in PRESETS.values()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title="model presets")
    for column in ("name", "model", "dtype", "download", "ready"):
        table.add_column(column, no_wrap=column == "name")
    for row in rows:
        download = f"{row['download_gb']} GB" if row["download_gb"] else "in the wheel"
        name = f"{row['name']} (default)" if row["default"] else str(row["name"])
        table.add_row(name, str(row["model"]), str(row["dtype"]), download,
                      "yes" if row["ready"] else "no")
    console.print(table)
    console.print("prepare one: sinkstream model prepare NAME; use it: --model NAME or "
                  "SINKSTREAM_MODEL=NAME (details: --json)", soft_wrap=True)


@model_app.command("info")
def model_info(
    spec: Annotated[str | None, typer.Argument(help=_SPEC_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Load the model and show its architecture, size, fingerprint and state bytes.

    The per-stream state bytes are those at the current settings (sink_tokens,
    recent_tokens, dtype)."""
    import json

    from workers.engines.base import EngineError
    from workers.engines.loading import describe_engine, load_engine

    cfg = settings() if spec is None else settings(model=spec)
    try:
        engine = load_engine(cfg)
    except EngineError as exc:
        raise _model_error(exc) from None
    info = describe_engine(engine, cfg)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    from rich.table import Table

    table = Table(title=f"model {cfg.model}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    console.print(table)

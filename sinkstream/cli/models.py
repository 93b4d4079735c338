"""``sinkstream model ...``: prepare and inspect the model a worker serves."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from sinkstream.cli.common import console, err_console, settings

model_app = typer.Typer(
    help="Prepare and inspect the model (SINKSTREAM_MODEL; default: smollm2).",
    no_args_is_help=True,
)

_SPEC_HELP = (
    "smollm2 | /path/to/hf-dir | /path/to/model.gguf | rwkv:/path/model.pth | "
    "tiny-llama[:seed] | tiny-qwen2[:seed] | tiny-rwkv[:seed] | ORG/NAME (hub); "
    "default: the model setting"
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
        prepared = prepare_model(text, cfg)
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


@model_app.command("info")
def model_info(
    spec: Annotated[str | None, typer.Argument(help=_SPEC_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Load the model and show its architecture, size, fingerprint and per-stream state bytes
    at the current settings (sink_tokens, recent_tokens, dtype)."""
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

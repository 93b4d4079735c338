"""Redis clients built from Settings, and one retry helper for transient Redis failures.

Every process (producer, worker, exporter) connects the same way, so TLS, credentials and
timeouts are configured once here rather than re-derived in each component. The retry helper
is deliberately small: it retries only connection-level failures (server restarting, network
blip, AOF still loading), waits with exponential backoff plus jitter so a fleet of clients does
not reconnect in lock step, and logs one WARNING per attempt, never a flood.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from sinkstream.settings import RedisTarget, Settings, parse_redis_url

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Failures worth retrying: the command may or may not have run, the server may come back.
#: Callers must only retry idempotent work (the producer's Lua append is; see producer/).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
)

#: Seconds an idle pooled connection may sit before it is PINGed on reuse, so a connection
#: silently dropped by a load balancer or a Redis restart is noticed before a real command.
DEFAULT_HEALTH_CHECK_INTERVAL = 30.0


def redis_from_settings(
    settings: Settings,
    *,
    decode_responses: bool = False,
    client_name: str | None = None,
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL,
    retries: int = 1,
    **overrides: Any,
) -> redis.Redis:
    """A client for ``settings.redis_url``.

    ``redis://``, ``rediss://`` and ``unix://`` give a plain :class:`redis.Redis`;
    ``redis+sentinel://`` a Redis for the Sentinel group's current master (it follows
    failovers); ``redis+cluster://`` a :class:`redis.cluster.RedisCluster`, typed as Redis
    here because it offers the same commands, pipelines (non-transactional, or one-slot
    transactions) and ``register_script`` for the one-slot scripts sinkstream runs.

    Credentials come from the URL (``redis://user:pass@host``). TLS files and hostname
    checking apply to ``rediss://`` only. ``retries`` is redis-py's own quiet reconnect (one
    immediate retry absorbs a pooled connection that died with a restarted server); longer
    outages are for :func:`retry_call`, which logs what it waits for.
    """
    kwargs: dict[str, Any] = {
        "decode_responses": decode_responses,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "health_check_interval": health_check_interval,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.008, cap=0.25), retries),
        "client_name": client_name,
    }
    kwargs.update(_tls_kwargs(settings))
    kwargs.update(overrides)
    target = parse_redis_url(settings.redis_url)
    if target.kind == "cluster":
        return cast(redis.Redis, _cluster_client(target, kwargs, retries))
    if target.kind == "sentinel":
        return _counted(_sentinel_client(settings, target, kwargs))
    return _counted(redis.Redis.from_url(settings.redis_url, **kwargs))


#: who makes a round trip, by the name of its thread: the worker's tasks run in the main
#: thread (solo pool); the others are the worker's background threads
ROUND_TRIP_SOURCES = ("tasks", "dispatcher", "lease", "vectorizer", "other")
_THREAD_SOURCES = (("MainThread", "tasks"), ("sinkstream-dispatcher", "dispatcher"),
                   ("lease-keeper", "lease"), ("sinkstream-vectorizer", "vectorizer"))


class _RoundTrips:
    """Round trips this process made through clients from :func:`redis_from_settings`:
    every packed command sent (a pipeline is one, whatever it holds; a health-check PING is
    one), by source (``ROUND_TRIP_SOURCES``). Read by the worker's
    ``sinkstream_redis_round_trips_total``."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(ROUND_TRIP_SOURCES, 0)
        self._lock = threading.Lock()

    def add(self) -> None:
        name = threading.current_thread().name
        source = next((s for prefix, s in _THREAD_SOURCES if name.startswith(prefix)),
                      "other")
        with self._lock:
            self._counts[source] += 1

    @property
    def count(self) -> int:
        """Every round trip so far."""
        return sum(self._counts.values())

    def by_source(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


ROUND_TRIPS = _RoundTrips()
_counting_classes: dict[type, type] = {}


def _counted(client: redis.Redis) -> redis.Redis:
    """``client`` with its connections counting round trips (``ROUND_TRIPS``). A Redis
    Cluster client is left uncounted: each node has a pool of its own."""
    pool = client.connection_pool
    base = pool.connection_class
    counting = _counting_classes.get(base)
    if counting is None:
        def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            ROUND_TRIPS.add()
            base.send_packed_command(self, command, check_health)

        counting = type(f"Counting{base.__name__}", (base,),
                        {"send_packed_command": send_packed_command})
        _counting_classes[base] = counting
    pool.connection_class = counting
    return client


def is_cluster(client: Any) -> bool:
    """True for a :class:`redis.cluster.RedisCluster` (what a ``redis+cluster://`` URL gives)."""
    return isinstance(client, RedisCluster)


def _cluster_client(target: RedisTarget, kwargs: dict[str, Any], retries: int) -> RedisCluster:
    """A Redis Cluster client: slot map from the startup nodes, MOVED/ASK followed, and on a
    dead node the topology is re-read and the command retried (a failover takes the cluster
    ``cluster-node-timeout`` plus an election, so a few retries with backoff up to 1 s)."""
    kwargs = dict(kwargs)
    kwargs.pop("health_check_interval", None)  # not a cluster option; nodes are pinged on use
    kwargs.pop("retry", None)
    if target.tls:
        kwargs["ssl"] = True
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), max(retries, 5)),
        **kwargs,
    )


def _sentinel_client(
    settings: Settings, target: RedisTarget, kwargs: dict[str, Any]
) -> redis.Redis:
    """A client for the current master of a Sentinel group; after a failover its connections
    ask the Sentinels again, so it follows the new master."""
    kwargs = dict(kwargs)
    if target.tls:
        kwargs["ssl"] = True
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
    }
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)
    assert target.master is not None  # parse_redis_url guarantees it
    return sentinel.master_for(
        target.master, db=target.db, username=target.username, password=target.password,
        **kwargs,
    )


def _tls_kwargs(settings: Settings) -> dict[str, Any]:
    """ssl_* arguments for TLS URLs; other schemes' connection classes reject them."""
    if not parse_redis_url(settings.redis_url).tls:
        return {}
    kwargs: dict[str, Any] = {"ssl_check_hostname": settings.redis_ssl_check_hostname}
    if settings.redis_ssl_ca_certs is not None:
        kwargs["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    if settings.redis_ssl_certfile is not None:
        kwargs["ssl_certfile"] = str(settings.redis_ssl_certfile)
    if settings.redis_ssl_keyfile is not None:
        kwargs["ssl_keyfile"] = str(settings.redis_ssl_keyfile)
    return kwargs


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and error messages.

    Works for multi-host URLs too (``redis+cluster://:pw@h1:1,h2:2``, and kombu's
    ``sentinel://:pw@h1:1;sentinel://:pw@h2:2``)."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe_redis_error(url: str, exc: BaseException) -> str:
    """One actionable sentence for a failed connection: which server, why, what to do."""
    where = redact_url(url)
    if isinstance(exc, redis.AuthenticationError):
        return (
            f"Redis at {where} refused the credentials ({exc}); check the user and password "
            "in SINKSTREAM_REDIS_URL"
        )
    if isinstance(exc, redis.BusyLoadingError):
        return f"Redis at {where} is still loading its data set; try again in a moment"
    return (
        f"cannot reach Redis at {where} ({exc}); start redis-server there or point "
        "SINKSTREAM_REDIS_URL (or redis_url in the --config file) at a running server"
    )


class Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random.

    The fixed half keeps a retry loop from spinning; the random half spreads many clients
    that lost the same server so they do not all reconnect in the same millisecond.
    """

    def __init__(self, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to ``cap``."""
        ceiling = min(self.cap, self.base * (2**self.failures))
        self.failures += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


_ALWAYS_WARN_ATTEMPTS = 2
_last_warned: dict[str, float] = {}
_MAX_WARNED_KEYS = 1024


def _warn_due(what: str, every_s: float) -> bool:
    if every_s <= 0:
        return True
    now = time.monotonic()
    last = _last_warned.get(what)
    if last is not None and now - last < every_s:
        return False
    if len(_last_warned) >= _MAX_WARNED_KEYS:
        _last_warned.clear()
    _last_warned[what] = now
    return True


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 8,
    base: float = 0.1,
    cap: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    sleep: Callable[[float], None] = time.sleep,
    logger: logging.Logger = log,
    warn_every_s: float = 0.0,
) -> T:
    """Call ``fn`` until it succeeds, retrying ``retry_on`` errors up to ``attempts`` times.

    ``fn`` must be safe to repeat (a lost reply means it may have run). With the defaults a
    caller rides out about 15 s of outage (0.1 s doubling to 5 s), e.g. a Redis restart, then
    the last error propagates. One WARNING per failed attempt says what is being retried; with
    ``warn_every_s`` > 0, after the first two attempts of a call (a blip is fully visible), at
    most one WARNING per that many seconds for the same ``what``, across calls (the rest at
    DEBUG), so a caller that keeps retrying through a long outage logs a line now and then,
    not a flood.
    """
    backoff = Backoff(base, cap)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts:
                raise
            delay = backoff.next_delay()
            due = _warn_due(what, warn_every_s)
            level = logging.WARNING if due or attempt <= _ALWAYS_WARN_ATTEMPTS else logging.DEBUG
            logger.log(
                level, "%s failed (%s: %s); attempt %d/%d, retrying in %.2fs",
                what, type(exc).__name__, exc, attempt, attempts, delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

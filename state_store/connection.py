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
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from sinkstream.settings import Settings

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
    """A client for ``settings.redis_url`` (redis://, rediss:// or unix://).

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
    return redis.Redis.from_url(settings.redis_url, **kwargs)


def _tls_kwargs(settings: Settings) -> dict[str, Any]:
    """ssl_* arguments for rediss:// URLs; other schemes' connection classes reject them."""
    if urlsplit(settings.redis_url).scheme != "rediss":
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
    """The URL with any password replaced by ``***``, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
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
) -> T:
    """Call ``fn`` until it succeeds, retrying ``retry_on`` errors up to ``attempts`` times.

    ``fn`` must be safe to repeat (a lost reply means it may have run). With the defaults a
    caller rides out about 15 s of outage (0.1 s doubling to 5 s), e.g. a Redis restart, then
    the last error propagates. One WARNING per failed attempt says what is being retried.
    """
    backoff = Backoff(base, cap)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts:
                raise
            delay = backoff.next_delay()
            logger.warning(
                "%s failed (%s: %s); attempt %d/%d, retrying in %.2fs",
                what, type(exc).__name__, exc, attempt, attempts, delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

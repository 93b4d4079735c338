"""The Celery application, built by a factory: ``create_app(settings)``.

``celery -A workers.app worker`` still works: Celery looks up ``workers.app.app``, which is
built on first access from the process's settings (``SINKSTREAM_*``, the config file), never
at import, so importing this module (tests, the CLI's ``--help``) reads no settings and
connects nowhere. ``sinkstream worker`` is that with the right command-line defaults.

Choices that matter for correctness, not taste:

* JSON only (``accept_content``): a Celery message can never carry a pickle.
* ``task_acks_late`` + prefetch 1: a task is acknowledged after it ran, and a worker holds at
  most one unstarted task, so a busy stream cannot hoard work and a killed worker loses at most
  the one task it was running (the dispatcher re-schedules it; leases + fencing make re-runs
  safe).
* ``visibility_timeout`` far longer than any task, so the Redis broker does not redeliver a task
  that is still running; redelivery that does happen is harmless (see the fencing commit).
* The model is loaded lazily in the process that runs tasks: nothing touches CUDA before a fork.
* The broker is separate from the data Redis when ``broker_url`` says so: a plain Redis,
  a Sentinel group (``sentinel://h:p;sentinel://h:p/0`` + ``broker_sentinel_master``, or
  derived from a ``redis+sentinel://`` data URL) or RabbitMQ (``amqp://``). Celery's Redis
  transport cannot talk to a Redis Cluster, so a cluster data URL requires a broker URL.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from celery import Celery

from sinkstream.settings import Settings, load_settings

_log = logging.getLogger(__name__)

#: Seconds the Redis broker waits before redelivering an unacknowledged task.
VISIBILITY_TIMEOUT_S = 4 * 3600


def _survive_restore_without_redis() -> None:
    """Keep a worker alive when kombu closes a Redis channel whose server is gone.

    On a lost broker connection kombu closes the channel, and closing re-queues the worker's
    unacknowledged messages. With Redis down that re-queue cannot run: kombu raises
    ``AttributeError`` on ``conninfo.hostname`` (or a ``ConnectionError``), outside the errors
    Celery expects there, and the worker exits with "Unrecoverable error" (celery/kombu #582,
    #970). It happens when acks failed just before (the chaos outage test hit it whenever
    Redis died right after a few acks; batching makes more short tasks, so more acks).
    Skipping the re-queue loses nothing: the messages stay in the broker's unacked hash, which
    any consumer restores after ``VISIBILITY_TIMEOUT_S``; a message whose ack failed had
    already run; and every task is a hint the dispatcher re-issues once its stream's
    ``scheduled`` flag lapses. A re-queue on a healthy connection (a normal shutdown) still
    runs as before.
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, "_sinkstream", False):
        return
    restore = qos.restore_unacked

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            restore(self, client)
        except (AttributeError, RedisConnectionError) as exc:
            _log.warning("broker connection lost: %d unacknowledged task message(s) stay in "
                         "the broker's unacked set (%s: %s)", len(self._delivered),
                         type(exc).__name__, exc)

    restore_unacked._sinkstream = True  # type: ignore[attr-defined]
    setattr(qos, "restore_unacked", restore_unacked)  # noqa: B010  (a method, on purpose)


def _ssl_options(settings: Settings, url: str) -> dict[str, Any] | None:
    if not url.startswith(("rediss://", "amqps://")):
        return None
    options: dict[str, Any] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if settings.redis_ssl_check_hostname
        else ssl.CERT_OPTIONAL,
    }
    if settings.redis_ssl_ca_certs:
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    if settings.redis_ssl_certfile:
        options["ssl_certfile"] = str(settings.redis_ssl_certfile)
    if settings.redis_ssl_keyfile:
        options["ssl_keyfile"] = str(settings.redis_ssl_keyfile)
    return options


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options for the broker URL.

    Redis and Sentinel brokers get the long ``visibility_timeout``; a ``sentinel://`` broker
    also the master name and the Sentinels' own credentials (kombu: ``master_name``,
    ``sentinel_kwargs``). AMQP needs none: RabbitMQ redelivers on a closed channel, not on a
    timer.
    """
    broker = settings.effective_broker_url
    if broker.startswith(("amqp://", "amqps://")):
        return {}
    options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    master = settings.effective_broker_sentinel_master
    if broker.startswith("sentinel://") and master:
        options["master_name"] = master
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": settings.redis_socket_timeout,
                                           "socket_connect_timeout": settings.redis_socket_timeout}
        password = settings.effective_broker_sentinel_password
        if password is not None:
            sentinel_kwargs["password"] = password
        options["sentinel_kwargs"] = sentinel_kwargs
    return options


def create_app(settings: Settings, *, register_tasks: bool = True) -> Celery:
    """A Celery app for ``settings``, with sinkstream's tasks registered on it.

    ``register_tasks=False`` builds the same app for a process that only *sends* tasks by
    name (the HTTP gateway): the tasks, and torch with them, are never imported there.
    """
    broker = settings.effective_broker_url
    app = Celery("sinkstream", broker=broker)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.broker_queue,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Celery 6's default, set now (silences a warning on every broker reconnect). With the
        # solo pool no task is running when the consumer sees the connection drop; with others
        # a cancelled task is redelivered, and fencing makes the redo harmless.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    ssl_options = _ssl_options(settings, broker)
    if ssl_options:
        app.conf.broker_use_ssl = ssl_options
    if register_tasks:
        from workers import tasks

        _survive_restore_without_redis()

        tasks.register(app, settings.broker_queue)
    return app


_default: Celery | None = None
_lock = threading.Lock()


def default_app() -> Celery:
    """This process's app, from its settings, built once on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = create_app(load_settings())
        return _default


def __getattr__(name: str) -> Any:
    """``workers.app.app``: what ``celery -A workers.app`` looks up, built on first access."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The Celery application: ``celery -A workers.app worker`` works; ``sinkstream worker`` wraps it.

Choices that matter for correctness, not taste:

* JSON only (``accept_content``): a Celery message can never carry a pickle.
* ``task_acks_late`` + prefetch 1: a task is acknowledged after it ran, and a worker holds at
  most one unstarted task, so a busy stream cannot hoard work and a killed worker loses at most
  the one task it was running (the sweeper re-schedules it; leases + fencing make re-runs safe).
* ``visibility_timeout`` far longer than any task, so the Redis broker does not redeliver a task
  that is still running; redelivery that does happen is harmless (see the fencing commit).
* The model is loaded lazily in the process that runs tasks: nothing touches CUDA before a fork.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery

from sinkstream.settings import Settings, load_settings

QUEUE = "sinkstream"
#: Seconds the Redis broker waits before redelivering an unacknowledged task.
VISIBILITY_TIMEOUT_S = 4 * 3600


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


def create_app(settings: Settings) -> Celery:
    broker = settings.effective_broker_url
    app = Celery("sinkstream", broker=broker, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    ssl_options = _ssl_options(settings, broker)
    if ssl_options:
        app.conf.broker_use_ssl = ssl_options
    return app


app = create_app(load_settings())

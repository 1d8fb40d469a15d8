"""The Celery application: JSON on the wire, late acks, one message per worker at a time.

``make_app`` builds it from ``Settings``; ``app`` is the one the ``onnxcam worker``
command and ``celery -A onnxcam.worker.app`` run.
"""

from __future__ import annotations

import warnings

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import task_postrun

from onnxcam.worker import broker, retention
from onnxcam.worker.settings import Settings, load_settings

QUEUE = "onnxcam"
EXPLAIN_TASK = "onnxcam.explain"


def make_app(settings: Settings) -> Celery:
    broker.install(settings.max_inline_job_bytes)
    # Celery warns at every lost connection that its default will become cancelling
    # running jobs; onnxcam chooses not to (below), on purpose.
    warnings.filterwarnings("ignore", message=r"\s*In Celery 5.1 we introduced",
                            category=CPendingDeprecationWarning)
    app = Celery("onnxcam", broker=settings.broker_url, backend=settings.backend_url,
                 include=["onnxcam.worker.tasks"])
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for jobs whose worker died only every 10 x 10 s by default;
        # sweep four times per visibility timeout (at least once a minute) instead,
        # so a dead worker's job is redelivered soon after the timeout.
        "unacked_restore_interval": max(1.0, min(60.0, settings.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        # Never pickle: a message is data, not code.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job is acknowledged only when it has finished; a worker that dies
        # mid-job leaves it to be redelivered (jobs are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        # A job running when the broker connection drops goes on: its outputs live in
        # the store, and its summary and Celery result are written after the broker is
        # back. Celery's choice, to kill it and rely on redelivery, loses the job
        # outright when Redis restarts without persistence (the message is gone). Where
        # the message survives (a network blip, a Redis with AOF), it may run a second
        # time beside the first: jobs are idempotent, so that costs time only.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        # The soft limit is the job's own, checked between batches (jobs.run_job):
        # Celery's would raise at any point, mid-write or while storing goes on.
        task_time_limit=settings.time_limit,
        task_default_queue=QUEUE,
        # Celery's result holds the task's return value only (a summary and URIs):
        # extended results would keep the job's arguments, inline pixels and all,
        # in Redis for a day.
        result_extended=False,
        result_expires=settings.result_expires,
        worker_max_memory_per_child=settings.max_memory_per_child or None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Drops what it cannot run with one log line and an ack (see broker.py).
        worker_consumer="onnxcam.worker.broker:Consumer",
    )
    return app


app = make_app(load_settings())
task_postrun.connect(retention.after_job, weak=False)  # ONNXCAM_RETENTION

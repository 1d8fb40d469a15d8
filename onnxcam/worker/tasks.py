"""The Celery task: decode the message, run the job, report; retries declared here."""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.exceptions import Ignore
from celery.signals import worker_process_init

from onnxcam.errors import (
    DuplicateJobError,
    OnnxcamError,
    OutOfMemoryError,
    StoreUnavailableError,
    WorkerLostError,
)
from onnxcam.words import clipped
from onnxcam.worker.app import EXPLAIN_TASK, app
from onnxcam.worker.jobs import ModelCache, run_job
from onnxcam.worker.memory import limit_process_memory, runtime_job_error
from onnxcam.worker.message import parse_job
from onnxcam.worker.records import claim, count_start, write_error
from onnxcam.worker.settings import Settings, load_settings
from onnxcam.worker.signing import digest, job_body
from onnxcam.worker.store import Store

log = logging.getLogger(__name__)

# Transient: worth a retry with backoff. Everything else, bad input above all, is final.
RETRY_FOR = (StoreUnavailableError, ConnectionError, TimeoutError)
# Starts of one job before it fails with worker_lost: a job whose process dies (out of
# memory, a crash in a library) is handed out again, and would go round forever. Room
# for the retries above and a few real worker deaths.
MAX_STARTS = 10


@functools.lru_cache(maxsize=1)
def process_state() -> tuple[Settings, Store, ModelCache]:
    """Settings, store and session cache, made once per worker process (after fork)."""
    settings = load_settings()
    store = Store(settings.store_url)
    return settings, store, ModelCache(store, settings.model_cache, settings.device,
                                       settings.limits, settings.max_job_memory)


@app.task(bind=True, name=EXPLAIN_TASK, autoretry_for=RETRY_FOR, retry_backoff=2,
          retry_backoff_max=60, retry_jitter=True, max_retries=6,
          Request="onnxcam.worker.broker:ExplainRequest",
          throws=(OnnxcamError,))  # expected failures: logged in one line, no traceback
def explain(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    # Any arguments at all: a message with others fails with malformed_job, not TypeError.
    job_id = self.request.id
    settings, store, models = process_state()
    try:  # as the main process did (broker.admit), unless the store failed it there
        claim(store, job_id, digest(job_id, job_body(args, kwargs)))
    except DuplicateJobError as refusal:
        log.warning("job %s refused: %s: %s", job_id, refusal.code, refusal)
        raise Ignore() from None  # no state: the id's is its owner's
    try:
        spec = parse_job(args[0] if len(args) == 1 and not kwargs else args, job_id,
                         settings.bounds)
        starts = count_start(store, job_id)
        if starts > MAX_STARTS:
            raise WorkerLostError(f"the job was started {starts - 1} times and its worker "
                                  "process died each time (out of memory?)")
        log.info("job %s: %d images, method %s", job_id, len(spec.images),
                 clipped(spec.method))
        return run_job(spec, store, models, settings, worker=self.request.hostname or "")
    except RETRY_FOR:
        raise
    except OnnxcamError as error:
        log.warning("job %s failed: %s: %s", job_id, error.code, error)
        write_error(store, job_id, error)
        raise
    except Exception as exc:
        # Raised on, a MemoryError would end the worker process (Celery's pool takes it
        # for unrecoverable) and the job would go round to kill the next one.
        ended = runtime_job_error(exc, settings.max_job_memory)
        if ended is None:
            raise
        del exc  # its traceback holds the job's frames and their arrays
        if isinstance(ended, OutOfMemoryError):
            models.drop_sessions()
        log.warning("job %s failed: %s: %s", job_id, ended.code, ended)
        write_error(store, job_id, ended)
        raise ended from None


@worker_process_init.connect
def _limit_memory(**_: Any) -> None:
    limit_process_memory(process_state()[0].max_job_memory)

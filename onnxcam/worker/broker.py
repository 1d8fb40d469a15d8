"""A Redis transport, a Celery consumer and a task request that drop a poison
message instead of stalling or dying on it, and hold a job to the worker's limits.

A queue item is popped by BRPOP, parsed as JSON, turned into a kombu message, noted
in Redis' ``unacked`` hash, and handed to Celery's consumer. A stray LPUSH or a
hostile producer can break any of these steps. Where kombu or Celery raise, the
worker used to die (bad JSON), or leave the item in ``unacked``: with a prefetch of
one the worker then takes nothing more, and after the visibility timeout the item
stalls the next worker too. Here every such item is logged once and acknowledged
(removed from ``unacked``); the worker serves on. Broker outages still raise, so
kombu reconnects as before.

Before a job is run, its request admits it (``admit``): signed with a worker key, when
keys are set, and under an id that is its own. A dropped or refused message whose job
id can be read is reported under it in Celery's result backend (``report``), never in
the store, and only where that id has no state yet: a sender does not wait forever,
and no job's result is overwritten.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from queue import Empty
from typing import Any

from celery import current_app, states
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis.exceptions import RedisError

from onnxcam.errors import (
    BadSignatureError,
    DuplicateJobError,
    JobTimeoutError,
    OnnxcamError,
    RejectedJobError,
    StoreError,
)
from onnxcam.words import clipped
from onnxcam.worker.records import claim, write_error
from onnxcam.worker.settings import load_settings
from onnxcam.worker.signing import digest, job_body, verify
from onnxcam.worker.store import Store

log = logging.getLogger(__name__)

# The broker itself failing: kombu reconnects. (kombu counts KeyError as a connection
# error too, but here a KeyError means a message without a field it needs.)
BROKER_DOWN = (RedisError, OSError)
REASON_CHARS = 300  # a reason quotes parts of the message; a huge one is cut
# A job id names a folder in the store: no separators, no leading dot, no NUL.
CANVAS = {"callbacks", "errbacks", "chain", "chord"}
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (Empty, *BROKER_DOWN):
            raise
        except Exception as exc:  # noqa: BLE001 - any item that breaks parsing is poison
            dropped(exc, getattr(exc, "job_id", None))
            raise Empty() from None

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except (Empty, *BROKER_DOWN):
            raise
        except Exception as exc:  # noqa: BLE001
            dropped(exc, getattr(exc, "job_id", None))
            raise Empty() from None

    def basic_consume(self, queue: Any, no_ack: Any, callback: Any, consumer_tag: Any,
                      **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        callbacks = self.connection._callbacks
        callbacks[queue] = partial(self._deliver_or_drop, callbacks[queue])
        return result

    def _deliver_or_drop(self, deliver: Callable[[Any], Any], raw: Any) -> Any:
        """Hand ``raw`` to kombu and Celery; if they raise, drop it and settle it."""
        properties = raw.get("properties") if isinstance(raw, dict) else None
        if not isinstance(properties, dict):
            dropped("no kombu envelope (a JSON object with a properties object)")
            return None
        # The producer's tag is not trusted: a list or null breaks kombu's bookkeeping
        # in Redis, and a copy of another message's tag would settle that one instead.
        tag = properties["delivery_tag"] = str(uuid.uuid4())
        try:
            return deliver(raw)
        except BROKER_DOWN:
            raise
        except Exception as exc:  # noqa: BLE001 - kombu or Celery could not take it
            dropped(exc)
            self.qos.ack(tag)  # out of unacked; harmless if Celery settled it already
            return None


class Transport(kombu_redis.Transport):
    Channel = Channel


class Consumer(CeleryConsumer):
    """Celery's consumer, dropping a message it cannot run with one log line and an
    ack, where Celery logs a traceback and, for an unknown task, writes a failure
    under whatever task id the message gives (another job's, maybe)."""

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._drop(message, f"unknown task {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        if isinstance(exc, RefusedJobError):
            refused(exc.job_id, exc.error)
            self._ack(message)
        else:
            self._drop(message, exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._drop(message, exc)

    def _drop(self, message: Any, reason: object) -> None:
        dropped(reason, _job_id(getattr(message, "headers", None)))
        self._ack(message)

    def _ack(self, message: Any) -> None:
        if not message.acknowledged:
            message.ack_log_error(log, self.connection_errors)


class RefusedJobError(InvalidTaskError):
    """A task message refused by ``admit``: the consumer acknowledges it and runs nothing."""

    def __init__(self, job_id: str, error: OnnxcamError) -> None:
        super().__init__(str(error))
        self.job_id = job_id
        self.error = error


@functools.lru_cache(maxsize=1)
def _admission() -> tuple[tuple[bytes, ...], Store]:
    """The main process's signing keys and store, read once."""
    settings = load_settings()
    return settings.signing_keys, Store(settings.store_url)


def admit(job_id: str, body: Any) -> None:
    """Refuse (RefusedJobError) a job not signed with one of the worker's keys, when it
    has keys, or whose id is bound to another request; bind an unbound id to this one.

    In the worker's main process, before the job goes to the pool: a refused job leaves
    no state in Celery's backend (a pool process would write STARTED, then FAILURE, over
    the id's owner) and nothing in the store. Where the store fails, the task decides."""
    keys, store = _admission()
    try:
        if keys:
            verify(job_id, body, keys)
        claim(store, job_id, digest(job_id, body))
    except (BadSignatureError, DuplicateJobError) as error:
        raise RefusedJobError(job_id, error) from None
    except StoreError as exc:
        log.warning("job %s: its id is checked when it runs (the store: %s)", job_id, exc)


class ExplainRequest(Request):
    """Celery's request for one explain job, refusing (InvalidTaskError: the consumer
    drops it) a message whose fields Celery would trip on later, in the pool or the
    backend, where no ack or drop could follow."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidTaskError(f"not a task message ({type(exc).__name__}: {exc})") from None
        if not isinstance(self.id, str) or not JOB_ID.match(self.id):
            raise InvalidTaskError(f"task id {str(self.id)[:80]!r} is not a job id")
        if not isinstance(self._args, list | tuple) or not isinstance(self._kwargs, dict):
            raise InvalidTaskError("task arguments are not a list and an object")
        if self._eta is not None and self._eta > datetime.now(timezone.utc) + timedelta(
                seconds=self._app.conf.broker_transport_options["visibility_timeout"]):
            # Held unacknowledged past the visibility timeout, it would be handed to
            # every worker in turn. (Retries' countdowns are far shorter.)
            raise InvalidTaskError(f"an eta beyond the visibility timeout ({self._eta})")
        embed = self._payload[2]
        # A job runs alone: no canvas, and no other keys, which Celery would copy over
        # the request's own (its id among them).
        if embed is not None and (not isinstance(embed, dict) or not set(embed) <= CANVAS
                                  or any(embed.values())):
            raise InvalidTaskError("callbacks, errbacks, chains and chords are not taken")
        admit(self.id, job_body(self._args, self._kwargs))

    # The worker's settings bound a job's time, never the message's "timelimit" header
    # (a producer could otherwise lift both limits).
    time_limits = property(lambda self: (None, None), lambda self, value: None)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """In the worker's main process, when the process running this job was killed at
        ONNXCAM_TIME_LIMIT: error.json says why, before Celery marks the job failed. The
        records already stored stand (each was written whole)."""
        if not soft:
            error = JobTimeoutError(f"job killed at ONNXCAM_TIME_LIMIT ({timeout:g} s)")
            log.warning("job %s failed: %s: %s", self.id, error.code, error)
            try:
                # A store of its own: the pool processes' belongs to them.
                write_error(Store(load_settings().store_url), self.id, error)
            except Exception as exc:  # noqa: BLE001 - the main process must serve on
                log.error("job %s: cannot write error.json: %s", self.id, exc)
        super().on_timeout(soft, timeout)


def dropped(reason: object, job_id: str | None = None) -> None:
    """Log one line for a dropped message; with the ``job_id`` it gives, report it there."""
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}"
    text = clipped(str(reason), REASON_CHARS)
    where = f" of job {job_id}" if job_id else ""
    log.error("dropped a broker message%s that is not a valid onnxcam job (%s)", where, text)
    if job_id:
        report(job_id, RejectedJobError(f"the worker dropped the job's message unread: {text}"))


def refused(job_id: str, error: OnnxcamError) -> None:
    """Log one line for a message ``admit`` refused. An unsigned one is reported under
    its id (its sender may simply lack the key); a duplicate is not: its id is another
    job's, whose state stays that job's."""
    log.warning("job %s refused: %s: %s", job_id, error.code, error)
    if not isinstance(error, DuplicateJobError):
        report(job_id, error)


def report(job_id: str, error: OnnxcamError) -> None:
    """A FAILURE with ``error`` under ``job_id`` in Celery's backend, where the id has
    no state yet (PENDING): a job that ran or runs keeps its own. Its code reaches
    ``onnxcam status`` and ``result``; nothing is written to the store.

    Any broker client can read queued ids and, with the backend in the same Redis,
    write such states itself: this gives it nothing it had not."""
    app = current_app  # the worker's own (onnxcam.worker.app imports this module)
    try:
        if app.backend.get_state(job_id) == states.PENDING:
            app.backend.mark_as_failure(job_id, error)
    except Exception as exc:  # noqa: BLE001 - the consumer serves on whatever the backend does
        log.error("job %s: cannot report %s in the result backend: %s", job_id, error.code, exc)


def _job_id(headers: Any) -> str | None:
    """The job id of an onnxcam.explain task message's (protocol 2) headers, if any."""
    if not isinstance(headers, dict) or headers.get("task") != "onnxcam.explain":
        return None
    job_id = headers.get("id")
    return job_id if isinstance(job_id, str) and JOB_ID.match(job_id) else None


# kombu writes a queue item's headers after its body: in its last few KB.
TAIL_CHARS = 64 * 1024
_HEADERS = re.compile(r'"headers"\s*:\s*(?=\{)')


def _job_id_in_tail(text: str) -> str | None:
    """The job id in the headers of a queue item too large to parse, read from its tail
    alone (an item written otherwise than kombu does gives none)."""
    tail = text[-TAIL_CHARS:]
    found = list(_HEADERS.finditer(tail))
    if not found:
        return None
    try:
        headers, _ = json.JSONDecoder().raw_decode(tail, found[-1].end())
    except ValueError:
        return None
    return _job_id(headers)


# Room in a message beside its inline pixels: the envelope, and up to 256 paths of
# 4096 characters with their names.
MESSAGE_OVERHEAD = 8 * 2**20


def max_message_bytes(max_inline_job_bytes: int) -> int:
    """The largest queue item a worker parses: a job's inline pixels in base64, twice
    (Celery's body is base64 of the JSON job, whose inline data is base64 already), plus
    the envelope. Anything larger is no job a client sends, only a way to swell the
    worker (a 300 MB field grew it to 4.1 GB), and is dropped unread."""
    return math.ceil(max_inline_job_bytes * (4 / 3) ** 2) + MESSAGE_OVERHEAD


class MessageTooLargeError(ValueError):
    def __init__(self, message: str, job_id: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id


def _bounded(loads: Callable[[str], Any], limit: int) -> Callable[[str], Any]:
    def bounded_loads(text: Any) -> Any:
        if len(text) > limit:
            raise MessageTooLargeError(
                f"a queue item of {len(text)} bytes, over the {limit} a job can need "
                "(ONNXCAM_MAX_INLINE_JOB_BYTES)",
                _job_id_in_tail(text) if isinstance(text, str) else None)
        return loads(text)

    bounded_loads.unbounded = loads  # type: ignore[attr-defined]
    return bounded_loads


def install(max_inline_job_bytes: int | None = None) -> None:
    """Make redis:// and rediss:// broker URLs use this transport; with
    ``max_inline_job_bytes``, queue items too large for any job are dropped before
    they are parsed."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
    if max_inline_job_bytes is not None:
        # kombu's Redis channel parses every popped item with this module-level loads.
        plain = getattr(kombu_redis.loads, "unbounded", kombu_redis.loads)
        kombu_redis.loads = _bounded(  # type: ignore[assignment]
            plain, max_message_bytes(max_inline_job_bytes))

"""Telling a queued job the broker has lost from one still waiting.

A Redis without persistence (no AOF) comes back from a restart empty: the jobs
queued in it are gone, and Celery's PENDING, which also means "queued", would have
their clients wait forever. The store still has each one's ``request.json``, which
the client writes before it queues the job. A job is lost when the client wrote that
request, no worker started the job (no ``starts.json``), Redis started after the
request was written, and neither the queue nor Redis' unacknowledged set holds the
job's message, twice, half a second apart (a message a worker is taking is in neither
for a moment). The last check reads the whole queue, so it runs only when the first
ones pass, that is after a restart.

A job that had started when Redis restarted is not judged here: a job running then
goes on and ends normally (see ``app``), so "started" stays true until it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from onnxcam.worker.keys import REQUEST, STARTS, job_key
from onnxcam.worker.store import Store

log = logging.getLogger(__name__)

# Clock skew allowed between the store's clock (request.json's time) and Redis'.
CLOCK_SKEW = 60.0
# Queue items read per round trip: one may carry 16 MB of inline pixels.
SCAN_PAGE = 16
# A worker pops a message from the queue and then files it as unacknowledged: for a
# moment it is in neither. A job seen in neither place is looked for again this much
# later, so that moment is not taken for a loss.
CONFIRM_DELAY = 0.5

LOST_MESSAGE = ("the broker no longer holds this job and no worker started it: it was "
                "lost, most likely when Redis restarted without persistence (run Redis with "
                "appendonly yes, see the README); submit it again")


def lost_error() -> dict[str, str]:
    """A lost job's error, as ``error.json`` would give it."""
    return {"code": "job_lost", "message": LOST_MESSAGE}


def redis_started_at(client: Any) -> float:
    """When the Redis behind ``client`` started, by its own clock (seconds since 1970)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6 - float(client.info("server")["uptime_in_seconds"])


def lost_jobs(job_ids: Iterable[str], store: Store, app: Any) -> set[str]:
    """The ids among ``job_ids`` whose message the broker lost before any worker
    started them. Ids the store knows nothing of, or that have ended, are never lost
    (the caller asks only of jobs Celery calls PENDING)."""
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        started_at = redis_started_at(channel.client)
        candidates = {job_id for job_id in job_ids
                      if _waiting_since(store, job_id, started_at + CLOCK_SKEW)}
        if not candidates:
            return set()
        lost = candidates - held(channel, candidates)
        if lost:
            time.sleep(CONFIRM_DELAY)
            lost -= held(channel, lost)
    # A worker may have taken one while the queue was read: it has counted a start.
    return {job_id for job_id in lost if not store.exists(job_key(job_id, STARTS))}


def _waiting_since(store: Store, job_id: str, before: float) -> bool:
    """Whether the client wrote the job's request before ``before`` and no worker has
    started it."""
    written = store.modified(job_key(job_id, REQUEST))
    return written is not None and written < before \
        and not store.exists(job_key(job_id, STARTS))


def held(channel: Any, job_ids: set[str]) -> set[str]:
    """The ids among ``job_ids`` whose message is in the queue or handed out and not
    yet acknowledged. The queue is read before and after the unacknowledged set, so a
    message moving between the two (taken, or restored after a worker died) is seen.
    A message that merely mentions an id counts as holding it: the error is "not lost"."""
    from onnxcam.worker.app import QUEUE

    client = channel.client
    queues = [channel._q_for_pri(QUEUE, priority) for priority in channel.priority_steps]
    found: set[str] = set()
    for scan in (_queued, _unacked, _queued):
        for item in scan(client, queues, channel.unacked_key):
            found.update(job_id for job_id in job_ids if job_id.encode() in item)
        if found == job_ids:
            break
    return found


def _queued(client: Any, queues: list[str], unacked_key: str) -> Iterable[bytes]:
    for queue in dict.fromkeys(queues):
        start = 0
        while page := client.lrange(queue, start, start + SCAN_PAGE - 1):
            yield from page
            start += len(page)


def _unacked(client: Any, queues: list[str], unacked_key: str) -> Iterable[bytes]:
    for _tag, item in client.hscan_iter(unacked_key, count=SCAN_PAGE):
        yield item

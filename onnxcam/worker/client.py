"""Submitting explain jobs and collecting their results, from any process.

``submit`` publishes the bundle to the store under its sha256, splits the images
into chunks (one job each, so a worker sees whole batches) and queues them; it
needs no worker to be up. ``Job`` follows them by id.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.bundle import read_bundle
from onnxcam.engine.methods import get_method
from onnxcam.engine.targets import Contrast, Region, Weighting, is_target
from onnxcam.errors import BrokerUnavailableError, JobError, UnknownBundleError, UnknownJobError
from onnxcam.words import clipped, plural
from onnxcam.worker.keys import (
    ERROR,
    HEATMAP,
    IMAGE_FILES,
    SHA256,
    SUMMARY,
    bundle_key,
    image_key,
    job_key,
    json_bytes,
)
from onnxcam.worker.lost import lost_error, lost_jobs, redis_started_at
from onnxcam.worker.message import (
    ImageRef,
    JobSpec,
    parse_max_detections,
    parse_options,
    parse_threshold,
)
from onnxcam.worker.records import (
    detection_file_names,
    is_detection,
    job_known,
    read_error,
    read_record,
    read_request,
    record_indices,
    record_rows,
    write_digest,
    write_request,
)
from onnxcam.worker.settings import Settings, load_settings
from onnxcam.worker.signing import digest, signed
from onnxcam.worker.store import Store

STATUSES = ("pending", "started", "done", "failed")
_CELERY_STATES = {
    "PENDING": "pending", "RECEIVED": "pending", "STARTED": "started", "RETRY": "started",
    "SUCCESS": "done", "FAILURE": "failed", "REVOKED": "failed",
}


@functools.lru_cache(maxsize=4)
def _app(settings: Settings) -> Any:
    from onnxcam.worker.app import make_app

    return make_app(settings)


def image_ref(image: str | Path | bytes, inline_max_bytes: int, index: int) -> ImageRef:
    """A store URI stays a URI; a small local file travels inline; a larger one by path.

    ``inline_max_bytes`` is ONNXCAM_INLINE_MAX_BYTES, capped by what workers accept
    (ONNXCAM_MAX_INLINE_IMAGE_BYTES)."""
    if isinstance(image, bytes):
        return ImageRef(f"image-{index}", data=image)
    text = str(image)
    if "://" in text:
        return ImageRef(text.rsplit("/", 1)[-1], uri=text)
    path = Path(text).absolute()
    try:
        size = path.stat().st_size
    except OSError:
        size = None  # the worker reports a missing file as that image's error
    if size is not None and 0 < size <= inline_max_bytes:
        return ImageRef(path.name, data=path.read_bytes())
    return ImageRef(path.name, path=str(path))


@dataclass
class Job:
    """Queued explain jobs, one per chunk of images, followed through the store and
    Celery's result backend."""

    ids: list[str]
    settings: Settings

    @property
    def store(self) -> Store:
        return Store(self.settings.store_url)

    def statuses(self) -> list[str]:
        return [job_status(job_id, self.settings) for job_id in self.ids]

    def status(self) -> str:
        """One word for all chunks: failed, pending or started until all are done."""
        states = set(self.statuses())
        if "failed" in states:
            return "failed"
        if states == {"done"}:
            return "done"
        return "started" if states & {"started", "done"} else "pending"

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> list[dict[str, Any]]:
        """Block until every chunk has ended; return every image's record, in order.

        A chunk that failed as a whole gives each of its images an error record.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending, lost, failed = list(self.ids), set(), set()
        lost_check = LostCheck(self.settings)
        while pending:
            states = {j: celery_status(j, self.settings) for j in pending}
            lost |= lost_check.lost([j for j, state in states.items() if state == "pending"])
            failed |= {j for j, state in states.items() if state == "failed"}
            pending = [j for j, state in states.items()
                       if state not in ("done", "failed") and j not in lost]
            if pending and deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {plural(len(self.ids), 'job')} not "
                                   f"done after {timeout} s")
            if pending:
                time.sleep(interval)
        # A job the worker refused or dropped unread has its error in Celery's backend only.
        return [record for job_id in self.ids for record in job_records(
            job_id, self.store, lost_error() if job_id in lost
            else job_error(job_id, self.store, self.settings) if job_id in failed else None)]


class LostCheck:
    """Which of the jobs Celery calls PENDING a waiting client should give up on as lost
    (``onnxcam.worker.lost``): all of them once, then again only after Redis restarts
    (one cheap Redis call a poll), not every poll, since each check reads the store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.checked_at: float | None = None

    def lost(self, pending: list[str]) -> set[str]:
        if not pending:
            return set()
        app = _app(self.settings)
        with broker_errors(app):
            with app.connection_for_read() as connection:
                started_at = redis_started_at(connection.default_channel.client)
            if self.checked_at is not None and started_at < self.checked_at:
                return set()
            self.checked_at = started_at + 1  # clock to a second: a restart is later
            return lost_jobs(pending, Store(self.settings.store_url), app)


def submit(
    bundle: str | Path | bytes,
    images: Iterable[str | Path | bytes],
    method: str = "gradcam",
    targets: Any = None,
    *,
    chunk_size: int | None = None,
    settings: Settings | None = None,
    faithfulness_steps: int = 0,
    options: Mapping[str, float] | None = None,
    threshold: float | None = None,
    max_detections: int | None = None,
) -> Job:
    """Queue explain jobs for ``images`` with ``bundle`` (a path, bytes or published hash).

    ``targets`` is as ``Explainer.explain`` takes it: None (top-1), one target for every
    image, or one entry per image, each a target or a list of them; a target is a class
    number or label, ``"all-positive"`` (over ``threshold``), ``"top:k"``, ``Contrast``,
    ``Region`` (a mask only as a reference: ``{"region": c, "mask": "URI"}``),
    ``Weighting``, or any of these as a job message writes it (``target_from_json``).
    ``faithfulness_steps`` > 0 adds each row's deletion and insertion AUCs to its
    record (what ``onnxcam audit --faithfulness`` asks the workers for). ``options``
    sets the sampling methods' knobs: samples, noise, steps, seed. ``max_detections``
    caps a detection bundle's detections per image (None: the engine's 300)."""
    settings = settings or load_settings()
    get_method(method)  # an unknown name fails here, before anything is queued
    knobs = parse_options(dict(options or {}))
    cut = parse_threshold(threshold)
    kept = parse_max_detections(max_detections)
    store = Store(settings.store_url)
    sha = publish(bundle, store)
    inline = min(settings.inline_max_bytes, settings.max_inline_image_bytes)
    refs = [image_ref(image, inline, i) for i, image in enumerate(images)]
    if not refs:
        raise JobError("no images to explain")
    wanted = _per_image(targets, len(refs))
    size = chunk_size or settings.chunk_size
    if size > settings.max_job_images:  # workers would refuse every job as malformed
        raise JobError(f"chunks of {size} images; workers take at most "
                       f"{settings.max_job_images} per job (ONNXCAM_MAX_JOB_IMAGES)")
    app = _app(settings)
    check_broker(app)
    ids = []
    for start in range(0, len(refs), size):
        spec = JobSpec(str(uuid.uuid4()), sha, refs[start:start + size], method,
                       wanted[start:start + size], faithfulness_steps, knobs, cut, kept)
        send(app, spec, store, settings.signing_keys)
        ids.append(spec.job_id)
    return Job(ids, settings)


def send(app: Any, spec: JobSpec, store: Store, signing_keys: Sequence[bytes] = ()) -> None:
    """Record the request in the store and bind its id to it (its digest), then queue
    the message, signed with the first of ``signing_keys`` (ONNXCAM_SIGNING_KEY) if any."""
    from onnxcam.worker.app import EXPLAIN_TASK

    message = spec.to_message()
    write_request(store, spec.job_id, spec.request_record())
    write_digest(store, spec.job_id, digest(spec.job_id, message))
    if signing_keys:
        message = signed(spec.job_id, message, signing_keys[0])
    with broker_errors(app):
        app.send_task(EXPLAIN_TASK, args=[message], task_id=spec.job_id)


@contextmanager
def broker_errors(app: Any) -> Iterator[None]:
    """A broker or result backend that does not answer: one clear error, not a traceback."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    try:
        yield
    except (OperationalError, RedisError, ConnectionError, TimeoutError) as exc:
        where = app.conf.broker_url and _redacted(app.conf.broker_url)
        raise BrokerUnavailableError(f"cannot reach the broker at {where} "
                                     f"({type(exc).__name__}: {exc})") from None


def _redacted(url: str) -> str:
    """A URL without its password, as Celery's own messages write it (``:**@``)."""
    return masked(url, "**")


def masked(url: str, mask: str = "***") -> str:
    """``url`` as written, its password (if any) shown as ``mask``:
    ``redis://:***@host:6379/0``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc or parts.password is None:
        return url
    credentials, host = parts.netloc.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:{mask}@{host}").geturl()


def endpoints(settings: Settings) -> str:
    """The broker and store a client uses, passwords masked: with no settings at all
    they are a local Redis's database 0 and a folder in the user's home, which may
    be another program's or another deployment's."""
    return (f"broker {masked(settings.broker_url)}, "
            f"store {masked(Store(settings.store_url).location)}")


def check_broker(app: Any) -> None:
    """Fail fast, before anything is queued, when the broker does not answer."""
    with broker_errors(app), app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=5)


def publish(bundle: str | Path | bytes, store: Store) -> str:
    """Put a bundle in the store (a no-op when it is there); return its hash."""
    if isinstance(bundle, bytes):
        return store.put_bundle(bundle)
    text = str(bundle)
    if SHA256.match(text) and not Path(text).exists():
        if not store.exists(bundle_key(text)):
            raise UnknownBundleError(f"no bundle {text} in the store (publish it first)")
        return text
    # A file that is no onnxcam bundle is refused here, before it reaches any worker.
    return store.put_bundle(read_bundle(text).data)


def _per_image(targets: Any, count: int) -> list[Any]:
    """Each image's entry of the message's ``targets``, as JSON."""
    if targets is None:
        return [None] * count
    if is_target(targets) or isinstance(targets, Mapping):
        return [target_json(targets)] * count
    wanted = list(targets)
    if len(wanted) != count:
        raise JobError(f"{plural(len(wanted), 'target')} for {plural(count, 'image')} (give "
                       "one target for all, or one entry per image)")
    return [None if each is None else [target_json(t) for t in each]
            if isinstance(each, (list, tuple)) else target_json(each) for each in wanted]


def target_json(target: Any) -> Any:
    """A target as a job message writes it (``targets.target_from_json`` reads it)."""
    if isinstance(target, Mapping):
        return dict(target)
    if isinstance(target, Contrast):
        return {"contrast": [target_json(target.positive), target_json(target.negative)]}
    if isinstance(target, Region):
        if target.mask is not None:
            raise JobError("a region's mask travels by reference: give {'region': class, "
                           "'mask': 'URI or path'} (read as the job's images are)")
        return {"region": target_json(target.cls)}
    if isinstance(target, Weighting):
        return {"weights": np.asarray(target.weights, np.float32).tolist()}
    if not is_target(target):
        raise JobError(f"{clipped(repr(target))} is not a target")
    return target if isinstance(target, str) else int(target)


def celery_status(job_id: str, settings: Settings) -> str:
    """The status word from Celery's result backend alone: one Redis read. Enough
    while waiting on jobs just submitted, whose results cannot have expired yet."""
    app = _app(settings)
    with broker_errors(app):
        state = app.AsyncResult(job_id).state
    return _CELERY_STATES.get(state, "pending")


def job_status(job_id: str, settings: Settings) -> str:
    """pending, started, done or failed; UnknownJobError for an id never submitted."""
    word = celery_status(job_id, settings)
    if word == "pending":  # or Celery's result has expired: the store knows
        store = Store(settings.store_url)
        if not job_known(store, job_id):
            raise UnknownJobError(f"no job {job_id}")
        if store.exists(job_key(job_id, ERROR)):
            return "failed"
        if store.exists(job_key(job_id, SUMMARY)):
            return "done"
        if _lost(job_id, store, settings):
            return "failed"
    return word


def _lost(job_id: str, store: Store, settings: Settings) -> bool:
    """Whether the broker lost the job before any worker started it (``lost``)."""
    app = _app(settings)
    with broker_errors(app):
        return job_id in lost_jobs([job_id], store, app)


@dataclass(frozen=True)
class JobProgress:
    """How far one job has got: images with a record in the store, of the images its
    request names (None when it was sent without one), and Celery's own state."""

    done: int
    total: int | None
    celery_state: str


def job_progress(job_id: str, settings: Settings) -> JobProgress:
    """A job's per-image progress, from its folder in the store (the records a worker
    writes as each image ends) and its request; Celery's state as the backend holds it
    (PENDING for a job it does not know, or whose result has expired)."""
    store = Store(settings.store_url)
    request = read_request(store, job_id)
    total = len(request["images"]) if request is not None else None
    app = _app(settings)
    with broker_errors(app):
        state = str(app.AsyncResult(job_id).state)
    return JobProgress(len(record_indices(store, job_id)), total, state)


def job_error(job_id: str, store: Store, settings: Settings | None = None) -> dict[str, str] | None:
    """``{code, message}`` of a job that failed as a whole, or None.

    The store's error.json says it; when that is missing (the worker writes to another
    store, or died before writing), Celery's result, given ``settings``, still holds
    the error's type and message, and the message says where this client looked."""
    found = read_error(store, job_id)
    if found is not None or settings is None:
        return found
    app = _app(settings)
    with broker_errors(app):
        result = app.AsyncResult(job_id)
        failure = result.result if result.state == "FAILURE" else None
    if failure is None:
        return lost_error() if result.state == "PENDING" and _lost(job_id, store, settings) \
            else None
    code = getattr(failure, "code", "job_error")
    return {"code": code, "message": f"{failure}{_store_hint(store, code)}"}


# Codes a worker reports in Celery's backend alone (it refused or dropped the message
# before the job had a folder): no error.json is missing.
BACKEND_ONLY = ("bad_signature", "rejected")


def _store_hint(store: Store, code: str) -> str:
    """Why a client may not see what a worker wrote: the two use different stores."""
    where = store.location
    if code in BACKEND_ONLY:
        return ""
    if code == "unknown_bundle":
        return (f" (this client published it to {where}: the worker reads another store; "
                "give both the same ONNXCAM_STORE_URL, which, when relative, is relative to "
                "each process's folder)")
    return (f" (no error.json in {where}: if the worker writes to another store, give "
            "both the same ONNXCAM_STORE_URL)")


def job_records(job_id: str, store: Store,
                failure: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every row of a finished job, in image order, then target order: an image's record
    (``record_rows``), its error record, or one per target of an image of several.

    The images are those of ``request.json``; a job sent without one (it is optional)
    is read from the records in its folder alone. ``failure`` is the job's error where
    the store has none (a lost job's)."""
    request = read_request(store, job_id)
    if request is not None:
        names = {index: image["name"] for index, image in enumerate(request["images"])}
    else:
        found = record_indices(store, job_id)
        if not found and not job_known(store, job_id):
            raise UnknownJobError(f"no job {job_id}")
        names = {index: f"image-{index}" for index in range(found[-1] + 1 if found else 0)}
    failure = read_error(store, job_id) or failure
    stored = [read_record(store, job_id, index) for index in names]
    missing = {"code": "missing_result", "message": "no result stored"}
    if names and not any(stored) and failure is None:
        where = store.location
        missing["message"] = (f"no result stored in {where}, nor for any image of the job: "
                              "if a worker ran it, it wrote to another store; give both the "
                              "same ONNXCAM_STORE_URL")
    records = []
    for (index, name), record in zip(names.items(), stored):
        if record is None:
            error = failure or missing
            record = {"job": job_id, "index": index, "image": name,
                      "status": "error", "error": error}
        records.extend(record_rows(record))
    return records


def download(job_id: str, out: Path, settings: Settings) -> list[dict[str, Any]]:
    """Copy a finished job's files to ``out`` as ``onnxcam explain`` names them:
    ``<stem>.npy`` (float32 heatmap), ``<stem>.png``, ``<stem>.raw.npy`` and
    ``<stem>.json``; for an image of several targets, ``<stem>.<target>.npy`` and so on
    per row; for a detection bundle's image, ``<stem>.<rank>.<label>.npy`` and so on per
    detection. Returns the rows, error records included."""
    from itertools import groupby

    from onnxcam.engine.outputs import file_names, unique_stems

    store = Store(settings.store_url)
    records = job_records(job_id, store)
    images = [list(rows) for _, rows in groupby(records, key=lambda r: r["index"])]
    stems = unique_stems([rows[0]["image"] for rows in images])
    written = []
    for stem, rows in zip(stems, images):
        several = "target_name" in rows[0]  # one class keeps today's names and keys
        names = (detection_file_names(rows) if is_detection(rows[0])
                 else file_names([r["target_name"] for r in rows]) if several
                 else [""] * len(rows))
        for row, name in zip(rows, names):
            written.append(_download_row(store, job_id, row, out, stem, name))
    return written


def _download_row(store: Store, job_id: str, row: dict[str, Any], out: Path, stem: str,
                  name: str) -> dict[str, Any]:
    """One row's files under ``out`` as ``<stem>[.<name>]<suffix>``, and its record there
    (pointing at them); returns the row as the store has it."""
    import io

    import numpy as np

    from onnxcam.engine.outputs import npy_bytes
    from onnxcam.files import atomic_write

    if row["status"] != "ok":
        return row
    base = f"{stem}.{name}" if name else stem
    local: dict[str, str] = {}
    for kind, suffix in IMAGE_FILES.items() if "files" in row else ():
        data = store.get(image_key(job_id, row["index"], f".{name}{suffix}" if name
                                   else suffix))
        if suffix == HEATMAP:  # stored as float16; handed out as explain writes it
            data = npy_bytes(np.load(io.BytesIO(data)).astype(np.float32))
        atomic_write(out / f"{base}{suffix}", data)
        local[kind] = str(out / f"{base}{suffix}")
    atomic_write(out / f"{base}.json", json_bytes({**row, "files": local} if local else row))
    return row

"""The JSON records a job leaves in the store: its request, per-image records, summary,
error, and start count, under the names ``keys`` gives them."""

from __future__ import annotations

import json
from typing import Any

from onnxcam.errors import DuplicateJobError, OnnxcamError
from onnxcam.worker.keys import (
    DIGEST,
    ERROR,
    RECORD,
    RECORD_NAME,
    REQUEST,
    STARTS,
    SUMMARY,
    image_key,
    job_key,
    json_bytes,
)
from onnxcam.worker.store import Store


def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    data = store.find(key)
    return None if data is None else dict(json.loads(data))


def write_request(store: Store, job_id: str, request: dict[str, Any]) -> None:
    # Key order as the client has always written it (unsorted): the bytes stay the same.
    store.put(job_key(job_id, REQUEST), json.dumps(request).encode())


def write_digest(store: Store, job_id: str, digest: str) -> None:
    """The client's claim on ``job_id``, made before the job is queued."""
    store.put(job_key(job_id, DIGEST), digest.encode("ascii"))


def claim(store: Store, job_id: str, digest: str) -> None:
    """Bind ``job_id`` to the request whose digest is ``digest``, unless it is bound
    already: to the same request (a redelivery, a retry) that passes, to another it is
    a DuplicateJobError. Nothing is written then, so the first job's folder stays its own."""
    key = job_key(job_id, DIGEST)
    if store.create(key, digest.encode("ascii")):
        return
    if store.find(key) != digest.encode("ascii"):
        raise DuplicateJobError(f"job id {job_id} belongs to another request (its digest "
                                f"is in {DIGEST}); a job id names one request only")


def read_request(store: Store, job_id: str) -> dict[str, Any] | None:
    return _read_json(store, job_key(job_id, REQUEST))


def write_record(store: Store, job_id: str, index: int, record: dict[str, Any]) -> str:
    """Store image ``index``'s record; return its URI."""
    return store.put(image_key(job_id, index, RECORD), json_bytes(record))


def read_record(store: Store, job_id: str, index: int) -> dict[str, Any] | None:
    """Image ``index``'s record, or None while it has none."""
    return _read_json(store, image_key(job_id, index, RECORD))


# The key of a detection bundle's record that holds its rows, one per detection (the
# record of an image of other or several targets holds them in ``targets``).
DETECTIONS = "detections"
# The keys only a detection's row has, as ``onnxcam explain --json`` writes them besides
# a row's (``engine.outputs.detection_record``; ``label`` and ``class`` are the row's).
DETECTION_KEYS = frozenset({"box", "score", "class", "label", "anchor", "rank"})


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """An image's stored record as the rows users see, one per map: itself for one class
    or an error; else one per target or detection, each with the image's keys (none in
    ``targets`` or ``detections``: itself, saying that nothing was found)."""
    key = DETECTIONS if DETECTIONS in record else "targets"
    rows = record.get(key)
    if not isinstance(rows, list) or not rows:
        return [record]
    image = {name: value for name, value in record.items() if name != key}
    return [{**image, **row} for row in rows]


def is_detection(row: dict[str, Any]) -> bool:
    """Whether ``row`` (stored, or as ``record_rows`` gives it) is a detection's."""
    return DETECTION_KEYS <= set(row)


def detection_file_names(rows: list[dict[str, Any]]) -> list[str]:
    """One image's detections' parts of their file names, as ``onnxcam explain`` names
    them: ``<rank>.<label>``, file-safe (``outputs.file_names``)."""
    from onnxcam.engine.outputs import file_names

    return file_names([f"{row['rank']}.{row['label']}" for row in rows])


def record_indices(store: Store, job_id: str) -> list[int]:
    """The indices of the images that have a record, from the job's folder alone."""
    found = (RECORD_NAME.match(name) for name in store.names(job_key(job_id, "")))
    return sorted(int(match.group(1)) for match in found if match)


def job_known(store: Store, job_id: str) -> bool:
    """Whether the store has anything of the job: its request (optional), records,
    summary or error."""
    return any(store.exists(job_key(job_id, name)) for name in (REQUEST, SUMMARY, ERROR)) \
        or bool(record_indices(store, job_id))


def count_start(store: Store, job_id: str) -> int:
    """Note one more start of the job; return how many there have been, this one
    included. (Two workers starting one job at once may count once: the limit it
    serves is loose.)"""
    found = _read_json(store, job_key(job_id, STARTS))
    starts = int(found.get("starts", 0)) + 1 if isinstance(found, dict) else 1
    store.put(job_key(job_id, STARTS), json_bytes({"starts": starts}))
    return starts


def write_summary(store: Store, job_id: str, summary: dict[str, Any]) -> None:
    store.put(job_key(job_id, SUMMARY), json_bytes(summary))


def write_error(store: Store, job_id: str, exc: OnnxcamError) -> None:
    """Record why a whole job failed, for ``onnxcam result``."""
    store.put(job_key(job_id, ERROR), json_bytes(error_entry(exc)))


def read_error(store: Store, job_id: str) -> dict[str, str] | None:
    """``{code, message}`` of a job that failed as a whole, or None."""
    return _read_json(store, job_key(job_id, ERROR))


def error_entry(exc: OnnxcamError) -> dict[str, str]:
    """How records and error.json name an error."""
    return {"code": exc.code, "message": str(exc)}

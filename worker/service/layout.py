"""Where bundles and jobs live in the store, and the JSON records a job leaves there.

The store holds ``bundles/<sha256>.onnx`` and, per job, ``jobs/<job id>/``:

- ``request.json``: the job as submitted (without inline pixels), written by the client;
  optional, since any Celery client may send jobs: records are found without it;
- per image ``NNNNN.npy`` (float16 heatmap at the image's own size, its long side at most
  ONNXCAM_MAX_STORED_SIDE), ``NNNNN.png`` (overlay, the same size), ``NNNNN.raw.npy``
  (float32 map at layer resolution) and ``NNNNN.json``
  (the image's record, written last: a record that exists is final);
- ``summary.json`` when the worker is done, or ``error.json`` when the job failed as a whole;
- ``starts.json``: how many times a worker process began the job (a job whose process
  dies, out of memory say, is handed out again; see ``count_start``).

Users and scripts read these names and records, so they are spelled here once and
never change.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from onnxcam.errors import OnnxcamError, UnknownBundleError
from onnxcam.worker.outputs import HEATMAP, OVERLAY, RAW

if TYPE_CHECKING:  # the store imports this module for its bundle keys
    from onnxcam.worker.service.store import Store

BUNDLE_PREFIX = "bundles"
JOB_PREFIX = "jobs"
SHA256 = re.compile(r"^[0-9a-f]{64}$")

REQUEST = "request.json"
SUMMARY = "summary.json"
ERROR = "error.json"
STARTS = "starts.json"

# An image's files: the suffix of each (the engine's, see ``outputs.render``), under
# the name its record's "files" gives it; the record itself is written last.
RECORD = ".json"
RECORD_NAME = re.compile(r"^(\d{5,})\.json$")
IMAGE_FILES = {"heatmap": HEATMAP, "overlay": OVERLAY, "raw": RAW}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_key(sha: str) -> str:
    """The key of the bundle with hash ``sha``; anything but a hash is refused, so a
    message cannot name a key elsewhere in the store."""
    if not SHA256.match(sha):
        raise UnknownBundleError(f"{sha!r} is not a bundle hash (64 lowercase hex digits)")
    return f"{BUNDLE_PREFIX}/{sha}.onnx"


def job_key(job_id: str, name: str) -> str:
    return f"{JOB_PREFIX}/{job_id}/{name}"


def image_key(job_id: str, index: int, suffix: str) -> str:
    """The key of image ``index``'s file with ``suffix`` (HEATMAP, OVERLAY, RAW, RECORD)."""
    return job_key(job_id, f"{index:05d}{suffix}")


def json_bytes(value: Any) -> bytes:
    """Records as the worker writes them: sorted keys, so a rerun writes the same bytes."""
    return json.dumps(value, sort_keys=True).encode("utf-8")


def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    data = store.find(key)
    return None if data is None else dict(json.loads(data))


def write_request(store: Store, job_id: str, request: dict[str, Any]) -> None:
    # Key order as the client has always written it (unsorted): the bytes stay the same.
    store.put(job_key(job_id, REQUEST), json.dumps(request).encode())


def read_request(store: Store, job_id: str) -> dict[str, Any] | None:
    return _read_json(store, job_key(job_id, REQUEST))


def write_record(store: Store, job_id: str, index: int, record: dict[str, Any]) -> str:
    """Store image ``index``'s record; return its URI."""
    return store.put(image_key(job_id, index, RECORD), json_bytes(record))


def read_record(store: Store, job_id: str, index: int) -> dict[str, Any] | None:
    """Image ``index``'s record, or None while it has none."""
    return _read_json(store, image_key(job_id, index, RECORD))


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

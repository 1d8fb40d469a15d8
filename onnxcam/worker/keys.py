"""Where bundles and jobs live in the store: names only, no I/O (``records`` reads and
writes what lies under them).

The store holds ``bundles/<sha256>.onnx``, images for jobs under ``inputs/`` and, per
job, ``jobs/<job id>/``:

- ``request.json``: the job as submitted (without inline pixels), written by the client;
  optional, since any Celery client may send jobs: records are found without it;
- per image ``NNNNN.npy`` (float16 heatmap at the image's own size, its long side at most
  ONNXCAM_MAX_STORED_SIDE), ``NNNNN.png`` (overlay, the same size), ``NNNNN.raw.npy``
  (float32 map at layer resolution) and ``NNNNN.json``
  (the image's record, written last: a record that exists is final); an image of other
  or several targets has its maps per row as ``NNNNN.<target name>.npy`` and so on, and
  its one record lists the rows;
- ``request.sha256``: the SHA-256 (hex) of the job's canonical message
  (``onnxcam.worker.signing.digest``), written by the client before it queues the job or,
  for a job sent without it, by the first worker to take it: the id belongs to that
  request, and a message under the same id with another request is refused;
- ``summary.json`` when the worker is done, or ``error.json`` when the job failed as a whole;
- ``starts.json``: how many times a worker process began the job (a job whose process
  dies, out of memory say, is handed out again; see ``count_start``).

At the store's top, ``retention.json`` says when a worker last pruned it
(ONNXCAM_RETENTION, ``onnxcam.worker.retention``).

Users and scripts read these names and records, so they are spelled here once and
never change.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from onnxcam.engine.outputs import HEATMAP, OVERLAY, RAW
from onnxcam.errors import UnknownBundleError
from onnxcam.words import clipped

BUNDLE_PREFIX = "bundles"
JOB_PREFIX = "jobs"
# Where images that jobs name by store URI go, by whoever puts them there: with
# ONNXCAM_STORE_READS=inputs (the default) the one folder of the store jobs may read.
INPUT_PREFIX = "inputs"
SHA256 = re.compile(r"^[0-9a-f]{64}$")

REQUEST = "request.json"
DIGEST = "request.sha256"
SUMMARY = "summary.json"
ERROR = "error.json"
STARTS = "starts.json"
PRUNED_AT = "retention.json"

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
        raise UnknownBundleError(f"{clipped(sha)!r} is not a bundle hash (64 lowercase hex "
                                 "digits)")
    return f"{BUNDLE_PREFIX}/{sha}.onnx"


def job_key(job_id: str, name: str) -> str:
    return f"{JOB_PREFIX}/{job_id}/{name}"


def image_key(job_id: str, index: int, suffix: str) -> str:
    """The key of image ``index``'s file with ``suffix`` (HEATMAP, OVERLAY, RAW, RECORD)."""
    return job_key(job_id, f"{index:05d}{suffix}")


def json_bytes(value: Any) -> bytes:
    """Records as the worker writes them: sorted keys, so a rerun writes the same bytes."""
    return json.dumps(value, sort_keys=True).encode("utf-8")

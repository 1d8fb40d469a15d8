"""What binds a job to its request and to its sender: one canonical encoding of a job
message with its id, the digest of it that owns the id in the store, and an HMAC-SHA256
of it with a key shared by clients and workers (ONNXCAM_SIGNING_KEY).

Both cover the job id: a signed message replayed under another id no longer verifies,
and the digest of one request differs from another's under the same id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from onnxcam.errors import BadSignatureError

SIGNATURE = "sig"  # the message field carrying the signature, left out of what is signed

# Sorted keys, no spaces, ASCII only: the same job gives the same bytes on every side.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def job_body(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The job a task message carries: its one argument, or, for a message of any other
    shape (which the task ends with malformed_job), its arguments as they are."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return {"args": list(args), "kwargs": dict(kwargs)}


def _chunks(job_id: str, body: Any) -> Iterator[bytes]:
    if isinstance(body, Mapping):
        body = {key: value for key, value in body.items() if key != SIGNATURE}
    # Piece by piece: a job with 16 MiB of inline pixels is hashed without a copy.
    for chunk in _ENCODER.iterencode({"job": job_id, "body": body}):
        yield chunk.encode("ascii")


def canonical(job_id: str, body: Any) -> bytes:
    """``{"body":<the job without its signature>,"job":<id>}`` as compact JSON with
    sorted keys and ASCII escapes: what the digest and the signature are taken over."""
    return b"".join(_chunks(job_id, body))


def digest(job_id: str, body: Any) -> str:
    """SHA-256 of the canonical job, hex: what the store keeps as the id's owner."""
    found = hashlib.sha256()
    for chunk in _chunks(job_id, body):
        found.update(chunk)
    return found.hexdigest()


def sign(job_id: str, body: Any, key: bytes) -> str:
    """HMAC-SHA256 of the canonical job with ``key``, hex."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for chunk in _chunks(job_id, body):
        mac.update(chunk)
    return mac.hexdigest()


def signed(job_id: str, message: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``message`` with its signature under ``key`` in its ``sig`` field."""
    return {**message, SIGNATURE: sign(job_id, message, key)}


def verify(job_id: str, body: Any, keys: Sequence[bytes]) -> None:
    """Pass when ``body`` carries a signature of itself and ``job_id`` by one of ``keys``
    (several while keys rotate); else BadSignatureError, which never quotes a key."""
    given = body.get(SIGNATURE) if isinstance(body, Mapping) else None
    if not isinstance(given, str) or not given:
        raise BadSignatureError("the message is not signed; this worker takes only jobs "
                                "signed with a key of its ONNXCAM_SIGNING_KEY")
    if given.isascii() and any(hmac.compare_digest(sign(job_id, body, key), given)
                               for key in keys):
        return
    raise BadSignatureError("the message's signature matches no key of the worker's "
                            "ONNXCAM_SIGNING_KEY (forged, altered, or sent under "
                            "another job id)")

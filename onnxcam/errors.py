"""The error tree shared by every onnxcam package.

    OnnxcamError
    ├── ExportError                 the exporter cannot build a bundle
    │   ├── UnsupportedModelError   unreadable file, several inputs, rank != 4, ...
    │   ├── LayerNotFoundError      --layer names nothing; carries the candidates
    │   ├── UnsupportedOpError      no gradient rule for an op (analytic mode)
    │   └── VerificationError       the bundle disagrees with its source
    ├── BundleError                 a file is not a usable onnxcam bundle
    ├── BadImageError               not an image, truncated, too large, ...
    │   ├── MissingImageError       no file at that path or URI
    │   ├── ForbiddenPathError      a path outside the allowed roots, or a URI outside them
    │   ├── InvalidPathError        not a usable path or URI (a NUL byte, empty, too long)
    │   └── UnreachableImageError   an allowed image host refused or did not answer in time
    ├── BadTargetError              a class index outside [0, K)
    ├── BadMethodError              unknown method, or one the bundle cannot run
    ├── JobError                    a queued job failed or is malformed
    │   ├── MalformedJobError       the message is not a valid onnxcam job
    │   ├── UnknownBundleError      no bundle with that sha256 in the store
    │   ├── UnknownJobError         no job with that id was ever submitted
    │   ├── JobTimeoutError         the job ran past its soft time limit
    │   ├── OutOfMemoryError        the job went over the memory ceiling of its process
    │   ├── WorkerLostError         the job's worker process died each time it ran it
    │   ├── BadSignatureError       unsigned, or signed with no key the worker holds
    │   ├── DuplicateJobError       a job id already bound to another request
    │   ├── RejectedJobError        the worker dropped the message unread (too large, ...)
    │   └── JobLostError            the broker lost a job no worker started (Redis restarted)
    ├── StoreError                  the result store failed
    │   └── StoreUnavailableError   a transient failure (network, 5xx): retried
    ├── BrokerUnavailableError      the broker or result backend does not answer
    ├── SettingsError               an ONNXCAM_* variable has a bad value
    └── AuditError                  an audit cannot start or go on (results in the way, ...)
        └── ManifestError           SOURCE is not a manifest (no image column, no such folder)
            └── BadRowError         one manifest row is unusable (bad bbox, unknown label)

Every error has a short ``code`` used in job records and a one-line ``str``.
"""

from __future__ import annotations


class OnnxcamError(Exception):
    """Root of every error onnxcam raises on purpose."""

    code = "error"


class ExportError(OnnxcamError):
    code = "export_error"


class UnsupportedModelError(ExportError):
    code = "unsupported_model"


class LayerNotFoundError(ExportError):
    code = "layer_not_found"

    def __init__(self, name: str, candidates: list[str]) -> None:
        self.name = name
        self.candidates = candidates
        close = nearest(name, candidates)
        if close:
            hint = f"did you mean {' or '.join(map(repr, close))}?"
        elif len(candidates) <= 12:
            hint = f"candidates: {', '.join(candidates)}"
        else:  # a deep net has hundreds; the last ones are where target layers usually are
            hint = (f"{len(candidates)} candidates, the last: {', '.join(candidates[-6:])} "
                    "(`onnxcam layers` lists them all)")
        super().__init__(f"no layer named {name!r}; {hint}")


class UnsupportedOpError(ExportError):
    code = "unsupported_op"

    def __init__(self, op_type: str, node_name: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        where = f" (node {node_name!r})" if node_name else ""
        super().__init__(f"no gradient rule for op {op_type}{where}")


class VerificationError(ExportError):
    code = "verification_failed"


class BundleError(OnnxcamError):
    code = "bad_bundle"


class BadImageError(OnnxcamError):
    code = "bad_image"


class BadTargetError(OnnxcamError):
    code = "bad_target"


class BadMethodError(OnnxcamError):
    code = "bad_method"


class MissingImageError(BadImageError):
    code = "missing_image"


class ForbiddenPathError(BadImageError):
    code = "forbidden_path"


class InvalidPathError(BadImageError):
    code = "bad_path"


class UnreachableImageError(BadImageError):
    """Final, not transient: retrying a job for a host that refused it only delays the
    others (and would let a message make the worker knock on a port again and again)."""

    code = "unreachable_image"


class JobError(OnnxcamError):
    code = "job_error"


class MalformedJobError(JobError):
    code = "malformed_job"


class UnknownBundleError(JobError):
    code = "unknown_bundle"


class UnknownJobError(JobError):
    code = "unknown_job"


class JobTimeoutError(JobError):
    code = "time_limit"


class OutOfMemoryError(JobError):
    """Final: a MemoryError anywhere in a job (numpy, onnxruntime, Pillow) ends that job,
    not the worker; retrying it would only run out again."""

    code = "out_of_memory"


class WorkerLostError(JobError):
    code = "worker_lost"


class JobLostError(JobError):
    code = "job_lost"


class BadSignatureError(JobError):
    code = "bad_signature"


class DuplicateJobError(JobError):
    code = "duplicate_job"


class RejectedJobError(JobError):
    code = "rejected"


class StoreError(OnnxcamError):
    code = "store_error"


class StoreUnavailableError(StoreError):
    code = "store_unavailable"


class BrokerUnavailableError(OnnxcamError):
    code = "broker_unavailable"


class SettingsError(OnnxcamError):
    code = "bad_settings"


class AuditError(OnnxcamError):
    code = "audit_error"


class ManifestError(AuditError):
    code = "bad_manifest"


class BadRowError(ManifestError):
    """One row is unusable; the audit records it and goes on."""

    code = "bad_row"


def nearest(name: str, choices: list[str], count: int = 3) -> list[str]:
    """The ``choices`` closest to a misspelt ``name``, best first, for "did you mean"."""
    import difflib

    return difflib.get_close_matches(name, choices, n=count, cutoff=0.75)

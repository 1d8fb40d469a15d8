"""The worker service's settings, read once from ``ONNXCAM_*`` environment variables.

Deployments and tests set exactly these names; ``onnxcam worker --help`` lists them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onnxcam.engine.images import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    Limits,
    image_formats,
)
from onnxcam.errors import SettingsError


@dataclass(frozen=True)
class JobBounds:
    """What one job may ask of a worker, whatever its images' pixel counts: a job's
    memory and store footprint stay bounded by these and by what decoding one image
    at a time needs."""

    max_images: int = 256
    max_input_bytes: int = 2**30
    max_inline_image_bytes: int = 2**20
    max_inline_job_bytes: int = 16 * 2**20
    max_stored_side: int = 1024


DEFAULT_BOUNDS = JobBounds()

# Shorter keys are guessed; a key is typed or pasted by a person, so no maximum.
MIN_KEY_CHARS = 16


def _split_keys(text: str) -> list[str]:
    return [key.strip() for key in text.split(",") if key.strip()]


# One root of ONNXCAM_ALLOWED_ROOTS: ':' separates roots as in PATH, except inside a
# URI's scheme and authority ("http://user:secret@host:6399/imgs" is one root).
_ROOT = re.compile(r"""
      [A-Za-z][A-Za-z0-9+.-]*://            # a URI: its scheme,
      (?:[^/@]*@)?                          # user and password,
      (?:\[[^\]/]*\]|[^/:]*)(?::[0-9]+)?     # host (or [IPv6]) and port,
      [^:]*                                 # and path
    | [^:]*                                 # or a local folder
""", re.VERBOSE)


class Settings(BaseSettings):
    """Every knob of the worker service; each field is ``ONNXCAM_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ONNXCAM_", frozen=True, extra="ignore")

    broker_url: str = Field("redis://localhost:6379/0", description=(
        "Celery broker; redis://[:password@]host:port/db, or rediss:// for TLS."))
    result_backend: str = Field("", description="Celery result backend (default: the broker).")
    store_url: str = Field(default_factory=lambda: default_store(), description=(
        "Where bundles and results live (fsspec): a local folder, or s3://bucket/prefix."))
    allowed_roots: str = Field(".", description=(
        "Folders (or URI prefixes) whose images jobs may read, ':'-separated like PATH."))
    store_reads: str = Field("inputs", pattern="^(none|inputs|all)$", description=(
        "Which store objects a job may name as images: none, inputs (only under the "
        "store's inputs/ folder) or all (other jobs' results too)."))
    image_formats: str = Field(",".join(DEFAULT_FORMATS), description=(
        "Image formats (Pillow's names) jobs' images may be in, ','-separated; any "
        "other is refused with bad_image, unparsed. EPS is never read."))
    allowed_protocols: str = Field("file,s3", pattern=r"^[A-Za-z0-9+.,-]*$", description=(
        "URI protocols jobs may name for their images, ','-separated; no other is opened."))
    connect_timeout: float = Field(5.0, gt=0, description=(
        "Seconds to connect to an image's host (s3, http, ftp) before the image fails."))
    read_timeout: float = Field(10.0, gt=0, description=(
        "Seconds an image's host may stay silent mid-read before the image fails."))
    visibility_timeout: int = Field(3600, gt=0, description=(
        "Seconds before an unacknowledged job is handed to another worker."))
    soft_time_limit: float = Field(600.0, gt=0, description=(
        "Seconds after which a job is stopped and fails with time_limit."))
    time_limit: float = Field(660.0, gt=0, description=(
        "Seconds after which the process running a job is killed."))
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="Largest image file.")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description=(
        "Largest image in pixels, checked before decoding (decompression bombs)."))
    max_job_images: int = Field(DEFAULT_BOUNDS.max_images, gt=0, description=(
        "Images one job may carry; a job with more fails with malformed_job."))
    max_job_bytes: int = Field(DEFAULT_BOUNDS.max_input_bytes, gt=0, description=(
        "Input bytes one job may read in all (files, objects, inline data); images past "
        "it fail with bad_image."))
    max_inline_image_bytes: int = Field(DEFAULT_BOUNDS.max_inline_image_bytes, ge=0, description=(
        "Largest inline image (decoded bytes); a larger one fails with bad_image, undecoded."))
    max_inline_job_bytes: int = Field(DEFAULT_BOUNDS.max_inline_job_bytes, ge=0, description=(
        "Inline data one job may carry in all; inline images past it fail with bad_image."))
    max_stored_side: int = Field(DEFAULT_BOUNDS.max_stored_side, gt=0, description=(
        "Long side, in pixels, of the heatmaps and overlays a job stores; larger images' "
        "are scaled down (the raw map stays at layer resolution)."))
    model_cache: int = Field(4, gt=0, description=(
        "onnxruntime sessions each worker process keeps (least recently used go)."))
    max_job_memory: int = Field(default_factory=lambda: default_job_memory(), ge=0,
                                description=(
        "Bytes of memory each worker process may hold while it runs a job (0: no limit); "
        "a job that goes over fails with out_of_memory, and a bundle that would need "
        "more fails with bad_bundle before it runs. Default: half this machine's memory."))
    max_memory_per_child: int = Field(0, ge=0, description=(
        "KiB of resident memory after which a worker process is replaced (0: never)."))
    inline_max_bytes: int = Field(256 * 1024, ge=0, description=(
        "Client side: local images up to this size travel inside the message (0: never)."))
    chunk_size: int = Field(16, gt=0, description="Client side: images per job.")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description=(
        "Where workers run bundles: auto, cpu or cuda."))
    result_expires: int = Field(86400, gt=0, description=(
        "Seconds Celery's result (state and summary) of a job lives in Redis; the store "
        "keeps the job's records until they are pruned."))
    retention: str = Field("", description=(
        "Age past which workers remove ended jobs from the store (30m, 12h, 7d, 2w), at "
        "most once an hour, after a job; unset: never (see onnxcam store prune)."))
    signing_key: SecretStr = Field(SecretStr(""), description=(
        "Keys shared by clients and workers, ','-separated, at least 16 characters each: "
        "clients sign jobs with the first, workers take only jobs signed with one of them "
        "(unset: any broker client can queue jobs)."))

    @field_validator("signing_key")
    @classmethod
    def _long_keys(cls, value: SecretStr) -> SecretStr:
        if any(len(key) < MIN_KEY_CHARS for key in _split_keys(value.get_secret_value())):
            raise ValueError(f"each key needs at least {MIN_KEY_CHARS} characters")
        return value

    @field_validator("time_limit")
    @classmethod
    def _hard_after_soft(cls, value: float, info: ValidationInfo) -> float:
        soft = info.data.get("soft_time_limit")
        if soft is not None and value <= soft:
            raise ValueError("ONNXCAM_TIME_LIMIT must be larger than ONNXCAM_SOFT_TIME_LIMIT")
        return value

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: str) -> str:
        return ",".join(image_formats(value.split(",")))

    @field_validator("retention")
    @classmethod
    def _duration(cls, value: str) -> str:
        if value:
            parse_duration(value)
        return value

    @cached_property
    def retention_seconds(self) -> float | None:
        """ONNXCAM_RETENTION in seconds; None when unset."""
        return parse_duration(self.retention) if self.retention else None

    @cached_property
    def roots(self) -> list[str]:
        """The allowed roots as a list; empty entries are dropped."""
        return split_roots(self.allowed_roots)

    @cached_property
    def protocols(self) -> frozenset[str]:
        """The allowed protocols, lower case."""
        return frozenset(p.strip().lower() for p in self.allowed_protocols.split(",")
                         if p.strip())

    @cached_property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The signing keys, the one clients sign with first; none: jobs go unsigned."""
        return tuple(key.encode() for key in _split_keys(self.signing_key.get_secret_value()))

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def limits(self) -> Limits:
        return Limits(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes,
                      formats=tuple(self.image_formats.split(",")) if self.image_formats
                      else ())

    @property
    def bounds(self) -> JobBounds:
        return JobBounds(self.max_job_images, self.max_job_bytes, self.max_inline_image_bytes,
                         self.max_inline_job_bytes, self.max_stored_side)


def split_roots(text: str) -> list[str]:
    """ONNXCAM_ALLOWED_ROOTS as a list, empty entries dropped: ``/data/images:http://h:6399/
    imgs`` is two roots, the port's ':' being inside the URI."""
    roots, position = [], 0
    while position <= len(text):
        found = _ROOT.match(text, position)
        assert found is not None  # the local-folder branch matches anything, even ""
        roots.append(found.group())
        position = found.end() + 1  # past the ':' that ended it
    return [root for root in roots if root]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``, ``2w`` (or ``45s``); ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: a number and a unit, s, m, h, d or w "
                         "(7d, 12h, 30m)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and ``overrides``); a bad value is a SettingsError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]).upper() if first["loc"] else ""
        where = f"ONNXCAM_{field}: " if field else ""
        raise SettingsError(f"{where}{first['msg']}") from None


def default_store() -> str:
    """One folder per user whatever the current folder, so that a client and a worker
    on one machine agree without settings: $XDG_DATA_HOME/onnxcam/store, by default
    ~/.local/share/onnxcam/store."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return os.path.join(os.path.abspath(data), "onnxcam", "store")


def default_job_memory() -> int:
    """Half the memory this machine (or its cgroup, in a container) has; 0 if unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            total = min(total, int(limit.read()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        pass
    return max(total // 2, 0)


def describe_settings() -> str:
    """One line per variable, for ``onnxcam worker --help``."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        default = default if default not in ("", SecretStr("")) else "(unset)"
        lines.append(f"ONNXCAM_{name.upper()}: {field.description} [default: {default}]")
    return "\n".join(lines)

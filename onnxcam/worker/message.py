"""The job message: what a client puts on the queue, and how a worker reads it.

``parse_job`` trusts nothing: anything off is a MalformedJobError, and inline images
over the job bounds are refused before their base64 is decoded.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxcam.engine.detections import MAX_DETECTIONS
from onnxcam.engine.targets import MAX_TARGETS_PER_IMAGE
from onnxcam.errors import MalformedJobError
from onnxcam.words import clipped
from onnxcam.worker.settings import DEFAULT_BOUNDS, JobBounds

MESSAGE_VERSION = 1
MAX_LABEL_CHARS = 200  # a target given by label: longer is no label


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a job comes from: exactly one of path, uri and data."""

    name: str
    path: str | None = None
    uri: str | None = None
    data: bytes | None = None
    refusal: str | None = None  # why the worker refused it unread (inline data over a cap)

    def to_message(self) -> dict[str, str]:
        if self.data is not None:
            return {"name": self.name, "data": base64.b64encode(self.data).decode("ascii")}
        if self.uri is not None:
            return {"name": self.name, "uri": self.uri}
        return {"name": self.name, "path": str(self.path)}


@dataclass(frozen=True)
class JobSpec:
    """A parsed, validated job message."""

    job_id: str
    bundle: str
    images: list[ImageRef]
    method: str = "gradcam"
    # per image: None (top-1), a target as ``targets.target_from_json`` reads it (a class
    # number or label, "all-positive", "top:k", {"contrast": ...}, ...) or a list of them;
    # checked per image when the job runs (``worker.image_targets``)
    targets: list[Any] = field(default_factory=list)
    faithfulness_steps: int = 0  # > 0: also deletion and insertion AUCs, with this many steps
    options: dict[str, Any] = field(default_factory=dict)  # samples, noise, steps, seed
    threshold: float | None = None  # all-positive's probability cut; None: the engine's
    # detections kept per image of a detection bundle; None: the engine's default
    max_detections: int | None = None

    def to_message(self) -> dict[str, Any]:
        message = {
            "v": MESSAGE_VERSION,
            "job": self.job_id,
            "bundle": self.bundle,
            "method": self.method,
            "images": [ref.to_message() for ref in self.images],
            "targets": list(self.targets),
        }
        if self.faithfulness_steps:
            message["faithfulness_steps"] = self.faithfulness_steps
        if self.options:
            message["options"] = dict(self.options)
        if self.threshold is not None:  # absent otherwise: old messages keep their digest
            message["threshold"] = self.threshold
        if self.max_detections is not None:  # the same: absent unless set
            message["max_detections"] = self.max_detections
        return message

    def request_record(self) -> dict[str, Any]:
        """What the client stores at submit time: the job without inline pixels."""
        message = self.to_message()
        message["images"] = [{"name": ref.name} for ref in self.images]
        return message


def parse_job(message: Any, job_id: str, bounds: JobBounds = DEFAULT_BOUNDS) -> JobSpec:
    """Validate a message from the wire; anything off is a MalformedJobError.

    Inline images over ``bounds``' caps are refused here, before their base64 is
    decoded; their refs carry the refusal, which ends only their image."""
    if not isinstance(message, Mapping):
        raise MalformedJobError(f"a job message is a JSON object, not {type(message).__name__}")
    if message.get("v") != MESSAGE_VERSION:
        raise MalformedJobError("unsupported job message version "
                                f"{clipped(repr(message.get('v')))}")
    bundle, method, images = message.get("bundle"), message.get("method"), message.get("images")
    if not isinstance(bundle, str) or not isinstance(method, str):
        raise MalformedJobError("a job names its bundle and method as strings")
    if not isinstance(images, list) or not images:
        raise MalformedJobError("a job carries a non-empty list of images")
    if len(images) > bounds.max_images:
        raise MalformedJobError(f"{len(images)} images; a job may carry at most "
                                f"{bounds.max_images} (ONNXCAM_MAX_JOB_IMAGES)")
    inline = _InlineBudget(bounds)
    refs = [_parse_ref(item, index, inline) for index, item in enumerate(images)]
    targets = message.get("targets")
    if targets is None or targets == []:  # only null, absent or [] mean top-1 for all
        targets = [None] * len(refs)
    # Each entry is checked with its image (a bad one is that image's bad_target).
    if not isinstance(targets, list) or len(targets) != len(refs):
        raise MalformedJobError("targets must be a list with one entry per image (a target, "
                                "a list of targets, or null)")
    steps = message.get("faithfulness_steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= 1000:
        raise MalformedJobError("faithfulness_steps must be an int in [0, 1000]")
    return JobSpec(job_id, bundle, refs, method, targets, steps,
                   parse_options(message.get("options") or {}),
                   parse_threshold(message.get("threshold")),
                   parse_max_detections(message.get("max_detections")))


def parse_threshold(value: Any) -> float | None:
    """all-positive's threshold: absent (None), or a number strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise MalformedJobError("threshold must be a number in (0, 1)")
    return float(value)


def parse_max_detections(value: Any) -> int | None:
    """Detections kept per image of a detection bundle: absent (None: the engine's
    ``MAX_DETECTIONS``), or an int from 1 to ``MAX_TARGETS_PER_IMAGE``, as
    ``onnxcam explain --max-detections`` takes it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_TARGETS_PER_IMAGE:
        raise MalformedJobError(f"max_detections must be an int in [1, {MAX_TARGETS_PER_IMAGE}]"
                                f" (default {MAX_DETECTIONS})")
    return value


# The methods' knobs a job may set, with the values each accepts.
OPTION_RANGES = {"samples": (1, 1000), "steps": (1, 1000), "noise": (0.0, 100.0),
                 "seed": (0, 2**32 - 1)}
OPTION_FLAGS = ("eigen_smooth",)


def parse_options(options: Any) -> dict[str, Any]:
    known = {*OPTION_RANGES, *OPTION_FLAGS}
    if not isinstance(options, Mapping) or not set(options) <= known:
        raise MalformedJobError(f"options may set only {', '.join(sorted(known))}")
    for name, value in options.items():
        if name in OPTION_FLAGS:
            if not isinstance(value, bool):
                raise MalformedJobError(f"option {name} must be true or false")
            continue
        low, high = OPTION_RANGES[name]
        integral = name != "noise"
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) \
                or not low <= value <= high:
            raise MalformedJobError(f"option {name} must be {'an int' if integral else 'a number'}"
                                    f" in [{low}, {high}]")
    return dict(options)


# Names end up in records, in error messages and in Celery's result: no real one is
# longer (PATH_MAX is 4096), and a longer one would swell all three.
MAX_REF_CHARS = 4096


def _parse_ref(item: Any, index: int, inline: _InlineBudget) -> ImageRef:
    if not isinstance(item, Mapping):
        raise MalformedJobError(f"image {index} is not an object")
    sources = [key for key in ("path", "uri", "data") if key in item]
    if len(sources) != 1 or not all(isinstance(item[k], str) for k in sources):
        raise MalformedJobError(f"image {index} needs exactly one of path, uri or data")
    source = sources[0]
    # A path or URI too long for any file system ends its own image as bad_path, when
    # the worker reads it; meanwhile the image goes by its number.
    named = source != "data" and len(item[source]) <= MAX_REF_CHARS
    default = str(item[source]) if named else f"image-{index}"
    name = item["name"] if isinstance(item.get("name"), str) and item["name"] else default
    if len(name) > MAX_REF_CHARS:
        raise MalformedJobError(f"image {index}: its name is over {MAX_REF_CHARS} characters")
    if source == "data":
        refusal = inline.refusal(item["data"])
        if refusal is not None:
            return ImageRef(name, refusal=f"{name}: {refusal}")
        try:
            return ImageRef(name, data=base64.b64decode(item["data"], validate=True))
        except (binascii.Error, ValueError):
            raise MalformedJobError(f"image {index}: inline data is not base64") from None
    return ImageRef(name, **{source: item[source]})


class _InlineBudget:
    """The inline caps of one job: per image, and for all its inline images together."""

    def __init__(self, bounds: JobBounds) -> None:
        self.per_image = bounds.max_inline_image_bytes
        self.left = bounds.max_inline_job_bytes

    def refusal(self, text: str) -> str | None:
        """Why inline data of this base64 ``text`` is refused, or None (then it is
        counted): decided from the text's length alone, before any decoding."""
        size = len(text) * 3 // 4 - len(text[-2:]) + len(text[-2:].rstrip("="))
        if size > self.per_image:
            return (f"inline data is {size} bytes, over the {self.per_image} limit "
                    "(ONNXCAM_MAX_INLINE_IMAGE_BYTES)")
        if size > self.left:
            return ("inline data past the job's limit on inline data in all "
                    "(ONNXCAM_MAX_INLINE_JOB_BYTES)")
        self.left -= size
        return None


# -- fetching images --------------------------------------------------------------------

"""Running explain jobs as plain functions: fetch, explain, store (``message`` reads
the job from the wire).

Celery's task (``onnxcam.worker.tasks``) is a thin shell around ``run_job``; everything
here runs and is tested without a broker.

A job explains a chunk of images with one bundle. Its outputs live in the store
as ``onnxcam.worker.keys`` lays them out, each image's record written
last. A record that exists is final, so a redelivered job skips the images
already done: running a job twice writes the same keys with the same content.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from onnxcam.bundle import BundleInfo
from onnxcam.engine.explainer import DEFAULT_BATCH, Explainer, Explanation
from onnxcam.engine.images import RESAMPLING, Limits, decode, decoding, resize, to_array
from onnxcam.engine.outputs import render, stored_size
from onnxcam.engine.prefetch import prefetched
from onnxcam.errors import (
    BadImageError,
    BadTargetError,
    BundleError,
    JobTimeoutError,
    OnnxcamError,
)
from onnxcam.words import clipped
from onnxcam.worker.keys import IMAGE_FILES, RECORD, bundle_key, image_key
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.records import error_entry, read_record, write_record, write_summary
from onnxcam.worker.settings import Settings
from onnxcam.worker.sources import AllowList, read_path, read_uri
from onnxcam.worker.store import Store

log = logging.getLogger(__name__)

TOP_K = 5
MESSAGE_CHARS = 1000  # an error message in a summary; the record has it whole


def fetch(ref: ImageRef, store: Store, allowed: AllowList, limits: Limits) -> bytes:
    """The encoded bytes of one image, refusing what the worker may not read
    (``onnxcam.worker.sources`` holds the allow-list)."""
    if ref.refusal is not None:
        raise BadImageError(ref.refusal)
    if ref.data is not None:
        return ref.data
    if ref.path is not None:
        return read_path(ref.path, store, allowed, limits)
    assert ref.uri is not None
    return read_uri(ref.uri, store, allowed, limits)


@dataclass(frozen=True)
class Loaded:
    """One decoded image at the two sizes a job uses, so that nothing of a job grows with
    an image's pixel count once it is decoded."""

    model_input: np.ndarray  # uint8 [h, w, C] at the bundle's input size
    picture: np.ndarray  # uint8 [H', W', C], the long side at most ONNXCAM_MAX_STORED_SIDE
    size: tuple[int, int]  # the image's own [H, W]


def load(data: bytes, name: str, info: BundleInfo, limits: Limits, max_side: int) -> Loaded:
    """Decode one image and keep it only at the bundle's size and the stored size.

    The full-size image lives only inside this call, and only as Pillow decoded it:
    both sizes are resized from it directly, which gives what ``to_array`` and then
    ``resize`` would, without their two full-size copies (16-bit images, which
    ``to_array`` scales down, still take that way). Whatever converting raises (a mode
    Pillow cannot convert, MemoryError) ends this image only, as decoding's does."""
    image = decode(data, limits, name)
    width, height = image.size
    stored = stored_size(height, width, max_side)
    with decoding(name):
        if image.mode.startswith("I"):
            full = to_array(image, info.channels)
            return Loaded(resize(full, info.height, info.width, info.resize),
                          resize(full, *stored), (height, width))
        mode = "L" if info.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        return Loaded(_resized(image, info.height, info.width, info.resize),
                      _resized(image, *stored), (height, width))


def _resized(image: Image.Image, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """uint8 [height, width, C] of an L or RGB image, resampled as ``images.resize`` does."""
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLING.get(method, Image.Resampling.BILINEAR))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


class _InputBudget:
    """ONNXCAM_MAX_JOB_BYTES: the input bytes a job reads in all; an image that would
    take it past is refused before it is decoded."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def take(self, size: int, name: str) -> None:
        if size > self.left:
            raise BadImageError(f"{name}: past the job's limit on input bytes in all "
                                "(ONNXCAM_MAX_JOB_BYTES)")
        self.left -= size


# -- sessions ---------------------------------------------------------------------------


class ModelCache:
    """A bounded, least-recently-used cache of Explainers, keyed by bundle hash, and of
    the bundles refused (their ``BundleError`` messages), so that a bundle is read and
    checked once per process, whether it passes or not."""

    REFUSED = 256  # refusals remembered; a message is a few hundred bytes

    def __init__(self, store: Store, size: int, device: str = "auto",
                 limits: Limits | None = None, max_memory: int = 0) -> None:
        self.store = store
        self.size = size
        self.device = device
        self.limits = limits or Limits()
        self.max_memory = max_memory
        self._explainers: OrderedDict[str, Explainer] = OrderedDict()
        self._refused: OrderedDict[str, str] = OrderedDict()

    def drop_sessions(self) -> None:
        """Forget every Explainer (the verdicts stay): after a job ran out of memory, what
        the cached sessions hold must not make the next job run out too."""
        self._explainers.clear()
        gc.collect()

    def get(self, sha: str) -> Explainer:
        """The bundle's Explainer; BundleError, from the first verdict, if it was refused."""
        bundle_key(sha)  # refuses anything that is not a hash before touching the store
        if sha in self._explainers:
            self._explainers.move_to_end(sha)
            return self._explainers[sha]
        if sha in self._refused:
            raise BundleError(self._refused[sha])
        try:
            explainer = Explainer(self.store.get_bundle(sha), device=self.device,
                                  limits=self.limits, max_memory=self.max_memory)
        except BundleError as error:
            self._refused[sha] = str(error)
            while len(self._refused) > self.REFUSED:
                self._refused.popitem(last=False)
            raise
        self._explainers[sha] = explainer
        while len(self._explainers) > self.size:
            evicted, _ = self._explainers.popitem(last=False)
            log.info("dropped bundle %s from the session cache", evicted)
        return explainer


# -- running ----------------------------------------------------------------------------


def run_job(spec: JobSpec, store: Store, models: ModelCache, settings: Settings,
            worker: str = "") -> dict[str, Any]:
    """Explain every image of ``spec`` and store the outputs; return a small summary.

    Job-wide problems (unknown bundle or method) raise; a bad image or target
    becomes that image's error record and the others carry on.
    """
    started = time.perf_counter()
    explainer = models.get(spec.bundle)
    explainer.method(spec.method)
    batch = DEFAULT_BATCH[explainer.device]
    summaries: list[dict[str, Any] | None] = [None] * len(spec.images)
    todo = []
    for index in range(len(spec.images)):
        done = read_record(store, spec.job_id, index)
        if done is not None:
            summaries[index] = _summary(done, store.uri(image_key(spec.job_id, index, RECORD)))
        else:
            todo.append(index)
    if len(todo) < len(spec.images):
        log.info("job %s: %d of %d images already done", spec.job_id,
                 len(spec.images) - len(todo), len(spec.images))
    batches = [todo[start:start + batch] for start in range(0, len(todo), batch)]
    inputs = _InputBudget(settings.max_job_bytes)
    deadline = started + settings.soft_time_limit
    for index, record in _pipeline(spec, batches, store, explainer, settings, inputs,
                                   deadline):
        summaries[index] = _summary(record, store.uri(image_key(spec.job_id, index, RECORD)))
    images = [s for s in summaries if s is not None]
    failed = sum(1 for s in images if s["status"] == "error")
    summary = {
        "job": spec.job_id, "bundle": spec.bundle, "method": spec.method,
        "n": len(images), "ok": len(images) - failed, "errors": failed, "images": images,
    }
    write_summary(store, spec.job_id, summary)  # the same on every run
    return {**summary, "worker": worker, "seconds": round(time.perf_counter() - started, 4)}


def _summary(record: Mapping[str, Any], uri: str) -> dict[str, Any]:
    """An image's line in summary.json and Celery's result: its name and error message
    clipped (256 names and paths of 4096 characters would put 2 MB in Redis per job);
    the record, at ``uri``, has them whole."""
    summary = {"index": record["index"], "image": clipped(record["image"]),
               "status": record["status"], "record": uri}
    if record["status"] == "error":
        error = record["error"]
        summary["error"] = {"code": error["code"], "message": clipped(error["message"],
                                                                      MESSAGE_CHARS)}
    return summary


@dataclass
class _Decoded:
    """One batch after fetching and decoding: good images, and bad ones' error records."""

    arrays: dict[int, Loaded]
    errors: list[tuple[int, dict[str, Any]]]
    decode_ms: float


def _pipeline(spec: JobSpec, batches: list[list[int]], store: Store, explainer: Explainer,
              settings: Settings, inputs: _InputBudget,
              deadline: float) -> Iterator[tuple[int, dict[str, Any]]]:
    """Decode batch i+1 and store batch i-1 in threads while batch i is explained.

    Past ``deadline`` (``time.perf_counter``) no new batch is explained: the one being
    stored is finished, then JobTimeoutError."""
    decode = partial(_decode, spec, store=store, explainer=explainer, settings=settings,
                     inputs=inputs)
    # Storing (PNG encoding, store writes) overlaps the next batch too: its own thread.
    with ThreadPoolExecutor(max_workers=1) as storer:
        storing: Future[list[tuple[int, dict[str, Any]]]] | None = None
        for _, decoded in prefetched(batches, decode):
            clock = time.perf_counter()
            if clock > deadline:
                if storing is not None:
                    yield from storing.result()
                raise JobTimeoutError(f"job ran past ONNXCAM_SOFT_TIME_LIMIT "
                                      f"({settings.soft_time_limit:g} s)")
            explained = _explain(explainer, spec, list(decoded.arrays), decoded.arrays)
            timings = {"decode_ms": decoded.decode_ms,
                       "explain_ms": _ms(clock, time.perf_counter())}
            if storing is not None:
                yield from storing.result()
            storing = storer.submit(_store_batch, spec, decoded, explained, store, timings)
        if storing is not None:
            yield from storing.result()


def _decode(spec: JobSpec, indices: list[int], store: Store, explainer: Explainer,
            settings: Settings, inputs: _InputBudget) -> _Decoded:
    clock = time.perf_counter()
    info = explainer.info
    arrays: dict[int, Loaded] = {}
    errors: list[tuple[int, dict[str, Any]]] = []
    allowed = AllowList.from_settings(settings)
    for index in indices:
        try:
            target = spec.targets[index]
            if target is not None:
                info.class_index(target)  # a number in range, or one of the labels
            ref = spec.images[index]
            data = fetch(ref, store, allowed, explainer.limits)
            inputs.take(len(data), ref.name)
            arrays[index] = load(data, ref.name, info, explainer.limits,
                                 settings.max_stored_side)
        except (BadImageError, BadTargetError) as exc:
            errors.append((index, _error_record(spec, index, exc)))
    return _Decoded(arrays, errors, _ms(clock, time.perf_counter()))


def _store_batch(spec: JobSpec, decoded: _Decoded,
                 explained: Mapping[int, _Explained], store: Store,
                 timings: dict[str, float]) -> list[tuple[int, dict[str, Any]]]:
    """Write each image's files and record (the record last); bad images' records too."""
    results = []
    for index, found in explained.items():
        results.append((index, _store_image(spec, index, decoded.arrays[index], found, store,
                                            timings)))
    for index, record in decoded.errors:
        write_record(store, spec.job_id, index, record)
        results.append((index, record))
    return results


@dataclass
class _Explained:
    """One image's row in an engine call's Explanation, and its faithfulness scores."""

    explanation: Explanation
    position: int
    faithfulness: dict[str, float] | None = None


def _explain(explainer: Explainer, spec: JobSpec, indices: list[int],
             arrays: Mapping[int, Loaded]) -> dict[int, _Explained]:
    """Explain the decoded images: one engine call for the top-1 ones, one for the rest."""
    found: dict[int, _Explained] = {}
    top1 = [i for i in indices if spec.targets[i] is None]
    chosen = [i for i in indices if spec.targets[i] is not None]
    for group, targets in ((top1, None), (chosen, [spec.targets[i] for i in chosen])):
        if not group:
            continue
        images = [arrays[i].model_input for i in group]
        explanation = explainer.explain(images, targets=targets, method=spec.method,
                                        batch_size=len(group), **spec.options)
        scores = (_faithfulness(explainer, images, explanation, spec.faithfulness_steps)
                  if spec.faithfulness_steps else [None] * len(group))
        found.update((index, _Explained(explanation, position, scores[position]))
                     for position, index in enumerate(group))
    return found


def _faithfulness(explainer: Explainer, images: list[np.ndarray], explanation: Explanation,
                  steps: int) -> list[dict[str, float] | None]:
    """Deletion and insertion AUCs (RISE) of each image's heatmap, batched on the engine."""
    from onnxcam.engine.faithfulness import deletion_insertion_auc

    deletion, insertion = deletion_insertion_auc(explainer, explainer.prepare(images),
                                                 explanation.heatmaps, explanation.targets,
                                                 steps, explainer.info.head)
    return [{"deletion_auc": float(d), "insertion_auc": float(i)}
            for d, i in zip(deletion, insertion)]


def _store_image(spec: JobSpec, index: int, image: Loaded, found: _Explained,
                 store: Store, timings: dict[str, float]) -> dict[str, Any]:
    explanation, position = found.explanation, found.position
    files = render(image.picture, explanation.raw[position], ("npy", "png"), with_raw=True,
                   heatmap_dtype=np.float16)
    uris = {kind: store.put(image_key(spec.job_id, index, suffix), files[suffix])
            for kind, suffix in IMAGE_FILES.items()}
    record = {
        "job": spec.job_id, "index": index, "image": spec.images[index].name, "status": "ok",
        "bundle": spec.bundle, "method": spec.method,
        "target": int(explanation.targets[position]),
        "label": explanation.label(int(explanation.targets[position])),
        "logits": [float(v) for v in explanation.logits[position]],
        "top": explanation.top(TOP_K)[position],
        "flat": bool(explanation.flat[position]),
        "image_size": [int(image.size[0]), int(image.size[1])],
        "files": uris, "timings": timings,
    }
    if found.faithfulness is not None:
        record["faithfulness"] = found.faithfulness
    write_record(store, spec.job_id, index, record)
    return record


def _error_record(spec: JobSpec, index: int, exc: OnnxcamError) -> dict[str, Any]:
    return {"job": spec.job_id, "index": index, "image": spec.images[index].name,
            "status": "error", "bundle": spec.bundle, "method": spec.method,
            "error": error_entry(exc)}


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)

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

from onnxcam.bundle import OUTPUT_PIXELS, RESIZE_LETTERBOX, BundleInfo
from onnxcam.engine.detections import MAX_DETECTIONS, Detection
from onnxcam.engine.explainer import DEFAULT_BATCH, Explainer, Explanation
from onnxcam.engine.images import RESAMPLING, Limits, decode, decoding, resize, to_array
from onnxcam.engine.outputs import Box, detection_record, file_names, render, stored_size
from onnxcam.engine.prefetch import prefetched
from onnxcam.engine.targets import DEFAULT_THRESHOLD, Target
from onnxcam.errors import (
    BadImageError,
    BadTargetError,
    BundleError,
    JobTimeoutError,
    MalformedJobError,
    OnnxcamError,
)
from onnxcam.words import clipped
from onnxcam.worker.image_targets import TOP_1, decode_mask, image_targets, one_class
from onnxcam.worker.keys import IMAGE_FILES, RECORD, bundle_key, image_key
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.records import (
    DETECTIONS,
    detection_file_names,
    error_entry,
    read_record,
    write_record,
    write_summary,
)
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
    if method == RESIZE_LETTERBOX:  # padded, not stretched: images.resize places it
        array = np.asarray(image, dtype=np.uint8)
        return resize(array[..., None] if array.ndim == 2 else array, height, width, method)
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
    if spec.faithfulness_steps and explainer.info.detector:
        raise MalformedJobError("faithfulness_steps: deletion and insertion AUCs score a "
                                "class of the whole image; a detection bundle has none")
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
    for key in ("targets", DETECTIONS):  # an image of several targets, or a detector's
        if isinstance(record.get(key), list):
            summary["rows"] = len(record[key])
    if record["status"] == "error":
        error = record["error"]
        summary["error"] = {"code": error["code"], "message": clipped(error["message"],
                                                                      MESSAGE_CHARS)}
    return summary


@dataclass
class _Decoded:
    """One batch after fetching and decoding: good images with their checked targets,
    and bad ones' error records."""

    arrays: dict[int, Loaded]
    targets: dict[int, list[Target]]
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
            explained = _explain(explainer, spec, decoded)
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
    decoded = _Decoded({}, {}, [], 0.0)
    allowed = AllowList.from_settings(settings)

    def mask_of(reference: str) -> np.ndarray:
        # A mask is read as an image is, and counts towards the job's input bytes.
        data = read_uri(reference, store, allowed, explainer.limits)
        inputs.take(len(data), reference)
        return decode_mask(data, explainer.limits, reference)

    for index in indices:
        try:
            decoded.targets[index] = image_targets(spec.targets[index], info, mask_of)
            ref = spec.images[index]
            data = fetch(ref, store, allowed, explainer.limits)
            inputs.take(len(data), ref.name)
            decoded.arrays[index] = load(data, ref.name, info, explainer.limits,
                                         settings.max_stored_side)
        except (BadImageError, BadTargetError) as exc:
            decoded.errors.append((index, _error_record(spec, index, exc)))
    decoded.decode_ms = _ms(clock, time.perf_counter())
    return decoded


def _store_batch(spec: JobSpec, decoded: _Decoded, explained: _Explained, store: Store,
                 timings: dict[str, float]) -> list[tuple[int, dict[str, Any]]]:
    """Write each image's files and record (the record last); bad images' records too."""
    results = []
    for index, found in explained.images.items():
        image = decoded.arrays[index]
        if found.detector:
            record = _store_detections(spec, index, image, found, store, timings)
        elif one_class(decoded.targets[index]):
            record = _store_image(spec, index, image, found, store, timings)
        else:
            record = _store_rows(spec, index, image, found, store, timings)
        results.append((index, record))
    for index, record in [*decoded.errors, *explained.errors]:
        write_record(store, spec.job_id, index, record)
        results.append((index, record))
    return results


@dataclass
class _Row:
    """One (image, target) row of an engine call's Explanation, and its faithfulness."""

    explanation: Explanation
    position: int
    faithfulness: dict[str, float] | None = None

    @property
    def target(self) -> int:
        return int(self.explanation.targets[self.position])

    @property
    def name(self) -> str:
        return self.explanation.target_names[self.position]

    @property
    def detection(self) -> Detection:
        """A detection bundle's row: its detection."""
        return self.explanation.detections[self.position]


@dataclass
class _Image:
    """One image of an engine call: its rows (none where all-positive found no class),
    and what its record says of its scores, the same whatever its rows."""

    rows: list[_Row]
    score_part: dict[str, Any]  # ``logits``, ``top`` (and a segmenter's ``scores``)
    detector: bool = False  # its rows are a detection bundle's detections


@dataclass
class _Explained:
    """A batch's explained images by index, and those whose targets the engine refused."""

    images: dict[int, _Image]
    errors: list[tuple[int, dict[str, Any]]]


def _explain(explainer: Explainer, spec: JobSpec, decoded: _Decoded) -> _Explained:
    """Explain the decoded images: one engine call for the top-1 ones, one for those of
    one chosen class, and one for those with other or more targets (a detector's images
    all go in one: their targets pick detections, whatever they are)."""
    indices = list(decoded.arrays)
    wanted = decoded.targets
    plain = [i for i in indices if one_class(wanted[i])]
    groups = [
        ([i for i in plain if wanted[i][0] == TOP_1], None),
        ([i for i in plain if wanted[i][0] != TOP_1], "classes"),
        ([i for i in indices if not one_class(wanted[i])], "lists"),
    ]
    if explainer.info.detector:
        groups = [(indices, "lists")]
    explained = _Explained({}, [])
    for group, kind in groups:
        if group:
            targets = None if kind is None else [
                wanted[i][0] if kind == "classes" else wanted[i] for i in group]
            _explain_into(explained, explainer, spec, decoded, group, targets)
    return explained


def _explain_into(explained: _Explained, explainer: Explainer, spec: JobSpec,
                  decoded: _Decoded, group: list[int], targets: list[Any] | None) -> None:
    """``group``'s rows, in one engine call; when the engine refuses a target found only
    once the scores are known (a weighting of the wrong shape, too many classes picked),
    each image alone, so that one image's error does not end the others."""
    try:
        explained.images.update(_explain_group(explainer, spec, decoded, group, targets))
        return
    except BadTargetError as exc:
        if len(group) == 1:
            explained.errors.append((group[0], _error_record(spec, group[0], exc)))
            return
    for position, index in enumerate(group):
        _explain_into(explained, explainer, spec, decoded, [index],
                      None if targets is None else [targets[position]])


def _explain_group(explainer: Explainer, spec: JobSpec, decoded: _Decoded, group: list[int],
                   targets: list[Any] | None) -> dict[int, _Image]:
    """One engine call for ``group``'s images; each with its rows."""
    images = [decoded.arrays[i].model_input for i in group]
    threshold = DEFAULT_THRESHOLD if spec.threshold is None else spec.threshold
    max_detections = spec.max_detections or MAX_DETECTIONS
    explanation = explainer.explain(images, targets=targets, method=spec.method,
                                    batch_size=len(group), threshold=threshold,
                                    max_detections=max_detections, **spec.options)
    aucs = (_faithfulness(explainer, images, explanation, spec.faithfulness_steps)
            if spec.faithfulness_steps else [None] * len(explanation.targets))
    detector = explanation.info.detector
    found = {index: _Image([], part, detector)
             for index, part in zip(group, _score_parts(explanation))}
    assert explanation.image_index is not None  # set by Explanation itself
    for position, image in enumerate(explanation.image_index):
        found[group[int(image)]].rows.append(_Row(explanation, position, aucs[position]))
    return found


def _score_parts(explanation: Explanation) -> list[dict[str, Any]]:
    """Per image of the call, rows or none, what its record says of its scores:
    ``logits`` (a segmenter's, one set per pixel, stay out as in ``explain``'s records:
    null), ``top``, its TOP_K best classes, and for a segmenter ``scores``, every class's
    share of the image's pixels (a classifier's are its logits through its head)."""
    logits = explanation.image_logits
    assert logits is not None  # set by Explanation itself
    if explanation.info.detector:  # per anchor: out, as a segmenter's per pixel
        return [{"logits": None} for _ in logits]
    tops = explanation.image_top(TOP_K)
    if explanation.info.output == OUTPUT_PIXELS:
        return [{"logits": None, "top": top, "scores": [float(v) for v in shares]}
                for top, shares in zip(tops, explanation.scores_of(logits))]
    return [{"logits": [float(v) for v in each], "top": top}
            for each, top in zip(logits, tops)]


def _faithfulness(explainer: Explainer, images: list[np.ndarray], explanation: Explanation,
                  steps: int) -> list[dict[str, float] | None]:
    """Deletion and insertion AUCs (RISE) of each row's heatmap, batched on the engine;
    None for a row of no one class (a free weighting)."""
    from onnxcam.engine.faithfulness import deletion_insertion_auc

    assert explanation.image_index is not None
    scored = np.flatnonzero(explanation.targets >= 0)
    found: list[dict[str, float] | None] = [None] * len(explanation.targets)
    if not len(scored):
        return found
    prepared = explainer.prepare(images)[explanation.image_index[scored]]
    deletion, insertion = deletion_insertion_auc(explainer, prepared,
                                                 explanation.heatmaps[scored],
                                                 explanation.targets[scored], steps,
                                                 explainer.info.head)
    for row, d, i in zip(scored, deletion, insertion):
        found[row] = {"deletion_auc": float(d), "insertion_auc": float(i)}
    return found


def _store_image(spec: JobSpec, index: int, image: Loaded, found: _Image, store: Store,
                 timings: dict[str, float]) -> dict[str, Any]:
    """An image of one class: its files and record as they have always been (with a
    segmenter's ``scores``)."""
    (row,) = found.rows
    uris = _store_files(spec, index, "", image, row, store)
    record = {**_image_part(spec, index, image, found, timings), **_row_part(row, uris)}
    del record["target_name"]  # the record old messages have always got
    write_record(store, spec.job_id, index, record)
    return record


def _store_rows(spec: JobSpec, index: int, image: Loaded, found: _Image, store: Store,
                timings: dict[str, float]) -> dict[str, Any]:
    """An image of other or several targets: each row's files as ``NNNNN.<target>.npy``
    and so on, and one record whose ``targets`` holds the rows (none: all-positive
    found nothing; the record still has the image's scores)."""
    names = file_names([row.name for row in found.rows])
    parts = [_row_part(row, _store_files(spec, index, f".{name}", image, row, store))
             for row, name in zip(found.rows, names)]
    record = {**_image_part(spec, index, image, found, timings), "targets": parts}
    write_record(store, spec.job_id, index, record)
    return record


def _store_detections(spec: JobSpec, index: int, image: Loaded, found: _Image, store: Store,
                      timings: dict[str, float]) -> dict[str, Any]:
    """An image of a detection bundle: each detection's files as ``onnxcam explain``
    names them, ``NNNNN.<rank>.<label>.npy`` and so on (the overlay with its box drawn),
    and one record whose ``detections`` holds the rows, each with the detection's keys
    as ``explain --json`` writes them, its box in the image's own pixels (none: nothing
    detected; the record is still ok)."""
    names = detection_file_names([row.detection.as_dict() for row in found.rows])
    parts = []
    for row, name in zip(found.rows, names):
        keys = detection_record(row.detection, row.explanation, *image.size)
        drawn = detection_record(row.detection, row.explanation, *image.picture.shape[:2])
        caption = f"{row.detection.label} {row.detection.score:.2f}"
        uris = _store_files(spec, index, f".{name}", image, row, store,
                            (drawn["box"], caption))
        parts.append({**_row_part(row, uris), **keys})
    record = {**_image_part(spec, index, image, found, timings), DETECTIONS: parts}
    write_record(store, spec.job_id, index, record)
    return record


def _store_files(spec: JobSpec, index: int, name: str, image: Loaded, row: _Row,
                 store: Store, box: tuple[Box, str] | None = None) -> dict[str, str]:
    files = render(image.picture, row.explanation.raw[row.position], ("npy", "png"),
                   with_raw=True, heatmap_dtype=np.float16, box=box,
                   info=row.explanation.info)
    return {kind: store.put(image_key(spec.job_id, index, name + suffix), files[suffix])
            for kind, suffix in IMAGE_FILES.items()}


def _image_part(spec: JobSpec, index: int, image: Loaded, found: _Image,
                timings: dict[str, float]) -> dict[str, Any]:
    """What a record says of the image, whatever it was explained for."""
    return {
        "job": spec.job_id, "index": index, "image": spec.images[index].name,
        "status": "ok", "bundle": spec.bundle, "method": spec.method,
        "image_size": [int(image.size[0]), int(image.size[1])], "timings": timings,
        **found.score_part,
    }


def _row_part(row: _Row, uris: dict[str, str]) -> dict[str, Any]:
    """What a record says of one target's map."""
    explanation, position = row.explanation, row.position
    part = {"target": row.target, "target_name": row.name,
            "label": explanation.label(row.target),
            "flat": bool(explanation.flat[position]), "files": uris}
    if row.faithfulness is not None:
        part["faithfulness"] = row.faithfulness
    return part


def _error_record(spec: JobSpec, index: int, exc: OnnxcamError) -> dict[str, Any]:
    return {"job": spec.job_id, "index": index, "image": spec.images[index].name,
            "status": "error", "bundle": spec.bundle, "method": spec.method,
            "error": error_entry(exc)}


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)

"""The seam between the audit runner and whatever computes explanations.

The runner hands a backend chunks of ``AuditRow``s and gets back one list of
``RowOutcome``s per chunk, in any order. ``LocalBackend`` explains in this process;
a distributed backend fans the chunks out to workers, whose task body can call
``explain_rows`` as the local one does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import numpy as np

from onnxcam.audit.regions import Shape
from onnxcam.bundle import BundleInfo
from onnxcam.engine.detections import Detection, in_image, joined_logits
from onnxcam.engine.explainer import DEFAULT_BATCH, Explainer
from onnxcam.engine.faithfulness import DEFAULT_STEPS, deletion_insertion_auc
from onnxcam.engine.images import Limits, decode, load_image, read_bytes, resize
from onnxcam.engine.maps import heatmaps
from onnxcam.engine.prefetch import prefetched
from onnxcam.engine.targets import ALL_POSITIVE, DEFAULT_THRESHOLD, Target
from onnxcam.errors import BadImageError, OnnxcamError

log = logging.getLogger(__name__)

EXPLAIN_MODES = ("label", "pred")


@dataclass(frozen=True)
class GroundTruth:
    """One annotated object of a detection audit's image: its class and box (x0 y0 x1 y1,
    image pixels)."""

    cls: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class AuditRow:
    """One manifest row, resolved and checked against the bundle's labels."""

    index: int  # 0-based position in the manifest
    image: str  # a path (relative ones already joined to the manifest's folder) or a URI
    label: int | None = None  # class index
    bbox: tuple[float, float, float, float] | None = None  # x0 y0 x1 y1, image pixels
    mask: str | None = None  # path or URI of a binary mask image
    shapes: tuple[Shape, ...] = ()  # a data set's objects of the label, one region together
    # The mask is a PNG of class ids and the region is where it holds this value (a
    # segmentation manifest's finding); None: the mask is binary, nonzero is inside.
    mask_class: int | None = None
    # A multi-label or segmentation row: one map per finding (each a row of one label
    # and its region, if any), every finding of the image in one call.
    multi: bool = False
    findings: tuple[AuditRow, ...] = ()
    # A detection audit's image: its annotated objects (maybe none); every detection of
    # the image is explained. None: not a detection row.
    objects: tuple[GroundTruth, ...] | None = None

    @property
    def has_region(self) -> bool:
        return self.bbox is not None or self.mask is not None or bool(self.shapes)

    def finding(self, cls: int) -> AuditRow | None:
        """The finding of class ``cls``: the row itself for a single-label row."""
        if not self.multi:
            return self if self.label == cls else None
        return next((f for f in self.findings if f.label == cls), None)


@dataclass(frozen=True)
class ExplainSettings:
    """What every chunk of one audit is explained with."""

    method: str = "gradcam"
    explain: str = "label"  # "label": the row's label when it has one; "pred": top-1
    faithfulness: bool = False
    steps: int = DEFAULT_STEPS  # deletion/insertion curve points, minus one
    # Multi rows: all-positive's cut, and a sigmoid head's predicted classes.
    threshold: float = DEFAULT_THRESHOLD

    def target(self, row: AuditRow) -> int:
        """The class to explain for ``row``; -1 means the prediction."""
        if self.explain == "label" and row.label is not None:
            return row.label
        return -1

    def targets(self, row: AuditRow) -> list[Target]:
        """The targets of a multi-label or segmentation row: its findings' classes, or
        the classes over the threshold (``all-positive``) with ``pred`` or none; a
        detection row's: every detection (-1)."""
        if row.objects is not None:
            return [-1]
        if self.explain == "label" and row.findings:
            return [finding.label for finding in row.findings]  # type: ignore[misc]
        return [ALL_POSITIVE]


@dataclass
class MapOutcome:
    """One map of a multi-label or segmentation row."""

    target: int  # the class explained
    raw: np.ndarray  # as RowOutcome.raw
    heatmap: str | None = None  # where the backend stored the map; None: the runner does
    faithfulness: dict[str, float] | None = None
    # A detector's map: the detection explained, its box in the image's own pixels
    detection: Detection | None = None


@dataclass
class RowOutcome:
    """What a backend found for one row: the map and logits, or why it failed."""

    index: int
    raw: np.ndarray | None = None  # float32 [h, w], layer resolution, after ReLU
    logits: np.ndarray | None = None  # float32 [K]
    target: int = -1  # the class explained
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the original image
    heatmap: str | None = None  # where the backend stored the map; None: the runner does
    error_code: str = ""  # an OnnxcamError code, e.g. "bad_image"
    error: str = ""
    faithfulness: dict[str, float] | None = None  # {"deletion_auc", "insertion_auc"}
    maps: list[MapOutcome] | None = None  # a multi row's maps (raw and target unused)
    # float64 [K]: the class scores, where a backend has them without the logits (a
    # segmenter's over workers, whose records carry each class's share of pixels)
    scores: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return not self.error_code

    @property
    def scored(self) -> bool:
        return self.logits is not None or self.scores is not None

    @classmethod
    def failed(cls, index: int, error: OnnxcamError) -> RowOutcome:
        return cls(index, error_code=error.code, error=str(error))


class Backend(Protocol):
    """Computes explanations for an audit.

    ``run`` is a generator: it pulls chunks from ``chunks`` as it has room, and yields
    the outcomes of each chunk as a list (one per row, any order within and across
    chunks) as soon as that chunk is done. A bad row must become an error outcome,
    never an exception. The runner closes the generator on Ctrl-C or failure, so
    cleanup belongs in a ``finally``. Keep only a few chunks in flight: the runner
    buffers what arrives ahead of the oldest unfinished chunk.
    """

    info: BundleInfo  # the bundle explained: labels and class count for the manifest

    def run(
        self, chunks: Iterable[list[AuditRow]], settings: ExplainSettings
    ) -> Iterator[list[RowOutcome]]: ...


def read_source(source: str, limits: Limits) -> bytes:
    """The bytes of a local path, or of a URI (``scheme://...``) through fsspec."""
    if "://" not in source:
        return read_bytes(source, limits)
    import fsspec

    try:
        with fsspec.open(source, "rb") as stream:
            data = stream.read(limits.max_bytes + 1)
    except FileNotFoundError as exc:
        raise BadImageError(f"{source}: no such object") from exc
    except Exception as exc:  # any fsspec backend's error: unknown scheme, no access, ...
        raise BadImageError(f"{source}: cannot read ({exc.__class__.__name__}: {exc})") from exc
    if len(data) > limits.max_bytes:
        raise BadImageError(f"{source}: over the {limits.max_bytes}-byte limit")
    return bytes(data)


def load_source(source: str, channels: int, limits: Limits) -> np.ndarray:
    """A path or URI -> uint8 [H, W, C], with the engine's safe decoding."""
    return load_image(decode(read_source(source, limits), limits, source), channels, limits)


Decoded = list[np.ndarray | OnnxcamError]


def decode_rows(explainer: Explainer, rows: list[AuditRow]) -> Decoded:
    """Each row's image at its own size, or the error that stopped it."""
    decoded: Decoded = []
    for row in rows:
        try:
            decoded.append(load_source(row.image, explainer.info.channels, explainer.limits))
        except OnnxcamError as exc:
            decoded.append(exc)
    return decoded


def explain_rows(
    explainer: Explainer,
    rows: list[AuditRow],
    settings: ExplainSettings,
    decoded: Decoded | None = None,
    batch_size: int | None = None,
) -> list[RowOutcome]:
    """Explain one chunk: decode, resize to the bundle, run in batches, and with
    ``settings.faithfulness`` add the deletion and insertion AUCs. Bad images become
    error outcomes. ``decoded`` may hold the images already decoded."""
    decoded = decode_rows(explainer, rows) if decoded is None else decoded
    outcomes = [RowOutcome.failed(row.index, item) if isinstance(item, OnnxcamError)
                else RowOutcome(row.index) for row, item in zip(rows, decoded)]
    good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
    if not good:
        return outcomes
    info = explainer.info
    arrays = [decoded[i] for i in good]
    batch = np.stack([resize(a, info.height, info.width, info.resize)  # type: ignore[arg-type]
                      for a in arrays])
    size = batch_size or DEFAULT_BATCH[explainer.device]
    if any(rows[i].multi or rows[i].objects is not None for i in good):
        for position, i in enumerate(good):
            outcomes[i].image_size = arrays[position].shape[:2]  # type: ignore[union-attr]
        explain_findings(explainer, [rows[i] for i in good], batch,
                         [outcomes[i] for i in good], settings, size)
        return outcomes
    wanted = np.array([settings.target(rows[i]) for i in good], np.int64)
    cam = explainer.method(settings.method)
    parts = [explainer.run_batch(batch[s : s + size], wanted[s : s + size], cam)
             for s in range(0, len(batch), size)]
    raw = np.concatenate([p.raw for p in parts])
    logits = np.concatenate([p.logits for p in parts])
    targets = np.concatenate([p.targets for p in parts])
    if settings.faithfulness:
        deletion, insertion = deletion_insertion_auc(
            explainer, batch, heatmaps(raw, info.height, info.width), targets, settings.steps,
            info.head)
    for position, i in enumerate(good):
        outcome = outcomes[i]
        outcome.raw = raw[position]
        outcome.logits = logits[position]
        outcome.target = int(targets[position])
        outcome.image_size = arrays[position].shape[:2]  # type: ignore[union-attr]
        if settings.faithfulness:
            outcome.faithfulness = {"deletion_auc": float(deletion[position]),
                                    "insertion_auc": float(insertion[position])}
    return outcomes


def explain_findings(explainer: Explainer, rows: list[AuditRow], batch: np.ndarray,
                     outcomes: list[RowOutcome], settings: ExplainSettings, size: int) -> None:
    """Fill ``outcomes`` (one per image of ``batch``) with a map per target of each row
    (``ExplainSettings.targets``): one call per batch, the image run once for all its
    targets where the bundle can be cut at the layer."""
    info = explainer.info
    cam = explainer.method(settings.method)
    items: list[list[Target]] = [
        settings.targets(row) if row.multi or row.objects is not None
        else [settings.target(row)] for row in rows]
    parts = [explainer.run_batch(batch[s : s + size], items[s : s + size], cam, first_index=s,
                                 threshold=settings.threshold)
             for s in range(0, len(batch), size)]
    raw = np.concatenate([p.raw for p in parts])
    targets = np.concatenate([p.targets for p in parts]).astype(np.int64)
    images = np.concatenate([p.images() for p in parts]).astype(np.int64)
    # Every image's, rows or none: one all-positive found nothing in still shows its pred.
    image_logits = joined_logits([p.logits if p.image_logits is None else p.image_logits
                                  for p in parts])
    detections = [d for p in parts for d in p.detections or []]  # a detector's, per map
    faithfulness: list[dict[str, float] | None] = [None] * len(raw)
    if settings.faithfulness and len(raw):
        deletion, insertion = deletion_insertion_auc(
            explainer, batch[images], heatmaps(raw, info.height, info.width), targets,
            settings.steps, info.head)
        faithfulness = [{"deletion_auc": float(d), "insertion_auc": float(i)}
                        for d, i in zip(deletion, insertion)]
    for position, (row, outcome) in enumerate(zip(rows, outcomes)):
        outcome.logits = image_logits[position]
        maps = [MapOutcome(int(targets[m]), raw[m], faithfulness=faithfulness[m])
                for m in np.flatnonzero(images == position)]
        if detections:
            height, width = outcome.image_size
            for found, m in zip(maps, np.flatnonzero(images == position)):
                detection = detections[m]
                # Rounded as a worker's record rounds it, so both match alike.
                box = in_image(detection.box, info, height, width)
                found.detection = replace(detection, box=(
                    round(box[0], 2), round(box[1], 2), round(box[2], 2), round(box[3], 2)))
        if row.objects is not None:
            outcome.logits = None  # a detector's [K, A]: its maps' detections say enough
            outcome.maps = maps
        elif row.multi:
            outcome.maps = maps
        else:  # a single-label row beside multi ones: its one map, as alone
            outcome.raw, outcome.target = maps[0].raw, maps[0].target
            outcome.faithfulness = maps[0].faithfulness


class LocalBackend:
    """Explains in this process with one ``Explainer``; the next chunk's images decode
    in a thread while the current chunk runs."""

    def __init__(self, explainer: Explainer, batch_size: int | None = None) -> None:
        self.explainer = explainer
        self.info = explainer.info
        self.batch_size = batch_size

    def run(
        self, chunks: Iterable[list[AuditRow]], settings: ExplainSettings
    ) -> Iterator[list[RowOutcome]]:
        self.explainer.method(settings.method)
        for rows, decoded in prefetched(chunks, partial(decode_rows, self.explainer)):
            yield explain_rows(self.explainer, rows, settings, decoded, self.batch_size)

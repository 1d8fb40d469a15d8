"""The explain engine: bundles and images in, heatmaps out, on onnxruntime alone.

``Explainer`` reads a bundle once, prepares images (``images``), runs its sessions
(``sessions``) and hands each batch to a method (``methods``) through one context.
Only the outputs a method needs leave the session (for Grad-CAM: the in-graph
``cam`` and the logits). Images given as files are decoded in a thread while the
previous batch runs, and every step works on whole batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcam.bundle import (
    DECODED_OUTPUTS,
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    LAYER_OUTPUTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_BOXES,
    OUTPUT_CAM,
    OUTPUT_DETECTIONS,
    OUTPUT_LOGITS,
    OUTPUT_PIXELS,
    OUTPUT_WEIGHTS,
    SEED,
    BundleInfo,
    activation_layout,
    read_bundle,
)
from onnxcam.bundle_checks import check_memory
from onnxcam.engine.detections import (
    MAX_DETECTIONS,
    Detection,
    check_outputs,
    decoded,
    joined_logits,
)
from onnxcam.engine.images import (
    DEFAULT_LIMITS,
    Limits,
    as_image_list,
    check_batch,
    prepare,
)
from onnxcam.engine.levels import (
    check_coverage,
    entry_of,
    finest_grid,
    has_local_heads,
    local_outputs,
    own_level_maps,
    rows_of,
)
from onnxcam.engine.maps import flat as flat_maps
from onnxcam.engine.maps import heatmaps as to_heatmaps
from onnxcam.engine.maps import resize_maps
from onnxcam.engine.methods import Method, MethodContext, MethodOptions, method_for
from onnxcam.engine.model_access import ModelAccess
from onnxcam.engine.prefetch import prefetched
from onnxcam.engine.sessions import SeedCut, Sessions
from onnxcam.engine.targets import (
    DEFAULT_THRESHOLD,
    Row,
    Target,
    check_max_detections,
    class_scores,
    detection_rows,
    parse_targets,
    picked_rows,
    plain,
    resolve,
    seeds,
)
from onnxcam.errors import BadImageError, BadTargetError
from onnxcam.runtime import out_of_memory, resolve_device
from onnxcam.scores import probabilities

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
# Rows per run of the part after the layer: a detector's seeds alone are [rows, K, A]
# (80 classes by 8400 anchors: 2.7 MB a row), so hundreds of detections go in chunks.
HEAD_CHUNK = 32

__all__ = ["DEFAULT_BATCH", "BatchResult", "Explainer", "Explanation", "method_for"]


@dataclass
class Explanation:
    """What ``Explainer.explain`` returns: one row per image and target (one per image
    unless an image was given several targets), in image order, then target order."""

    heatmaps: np.ndarray  # float32 [M, H, W] in [0, 1] at the model's input size
    # float32 [M, h, w]: the method's map at layer resolution, after ReLU (gradient
    # methods: [M, H, W] at input resolution)
    raw: np.ndarray
    targets: np.ndarray  # int64 [M]: the class each row explains (-1: a free Weighting)
    logits: np.ndarray  # float32 [M, K] (segmenters [M, K, h, w]): the row's image's
    info: BundleInfo  # the bundle explained, for its labels
    method: str
    # The raw map at every exported layer, early to late, by layer name (empty for
    # methods whose map does not depend on a layer, such as saliency).
    layer_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # Gradient methods: the signed per-channel image behind the map, float32
    # [N, H, W, C] (see each method); None for CAM methods.
    input_gradients: np.ndarray | None = None
    # int [M]: the image (its position in the call) each row explains; left out: row i
    # is image i.
    image_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Each row's target by name: the class label, "a-vs-b" for a contrast, a Region's or
    # Weighting's name; left out: the labels of ``targets``.
    target_names: list[str] = field(default_factory=list)
    # float32 [N, ...]: every image's logits, rows or none (all-positive may find no class
    # for an image); left out: ``logits``, one row per image.
    image_logits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # A detector's rows: each row's detection (box, score, class, label, anchor, rank);
    # empty for other bundles. A detector's ``logits`` are then each row's anchor's
    # class scores [M, K], and ``image_logits`` every image's [N, K, A].
    detections: list[Detection] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = len(self.targets)
        if len(self.image_index) != rows:
            self.image_index = np.arange(rows)
        if len(self.target_names) != rows:
            self.target_names = [self.info.label(int(t)) for t in self.targets]
        if not len(self.image_logits):
            self.image_logits = self.logits

    @property
    def labels(self) -> list[str]:
        return list(self.info.labels)

    @cached_property  # read once per image when records are written
    def flat(self) -> np.ndarray:
        """bool [N]: maps that are constant up to rounding (all zero, say, when no
        region raises the target's score), whose heatmaps are zeros and show nothing."""
        return flat_maps(self.raw)

    @property
    def probabilities(self) -> np.ndarray:
        """float32 [M, K] by the bundle's head: a softmax over the classes, or a sigmoid
        per class (a multi-label head, whose rows need not sum to 1); for a segmenter,
        the share of pixels each class wins."""
        return self.scores_of(self.logits)

    def scores_of(self, logits: np.ndarray) -> np.ndarray:
        """``probabilities`` of any of this bundle's logits (``image_logits``, say)."""
        if self.info.output == OUTPUT_PIXELS:
            return class_scores(logits, self.info)
        return probabilities(logits, self.info.head).astype(np.float32)

    def top(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """Per row, the k best classes of its image as ``{class, label, score}`` (score:
        probability, by the head; a sigmoid head ranks each class on its own
        probability; a segmenter, each class on its share of the pixels)."""
        return self.ranked(self.logits, k)

    def image_top(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """``top`` per image, rows or none."""
        return self.ranked(self.image_logits, k)

    def ranked(self, logits: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        scores = self.scores_of(logits)
        # Ranked by the logits, as the top-1 target is: probabilities that round to
        # a tie in float32 must not put another class first.
        order = np.argsort(-class_scores(logits, self.info), axis=1, kind="stable")[:, :k]
        return [
            [{"class": int(c), "label": self.info.label(int(c)), "score": float(row[c])}
             for c in classes]
            for row, classes in zip(scores, order)
        ]

    def label(self, index: int) -> str:
        return self.info.label(index)


@dataclass
class BatchResult:
    """One batch's maps: the primary one, per layer, and a gradient method's image; one
    row per image and target (``image_index``: the image's position in the batch)."""

    raw: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    layer_maps: dict[str, np.ndarray]
    input_gradients: np.ndarray | None = None
    image_index: np.ndarray | None = None  # None: row i is image i
    target_names: list[str] | None = None  # None: the labels of ``targets``
    first_index: int = 0  # the batch's first image's position in the whole call
    image_logits: np.ndarray | None = None  # every image's logits; None: ``logits``
    detections: list[Detection] | None = None  # a detector's rows' detections

    @property
    def rows(self) -> int:
        return len(self.targets)

    def images(self) -> np.ndarray:
        """Each row's image, by its position in the whole call."""
        local = np.arange(self.rows) if self.image_index is None else self.image_index
        return local + self.first_index

    def names(self, info: BundleInfo) -> list[str]:
        return (self.target_names if self.target_names is not None
                else [info.label(int(t)) for t in self.targets])


def own_graph(run: Callable[[], list[np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """A detector's own graph's outputs ``names`` for one image, by ``run``; an image it
    cannot run on is a ``BadImageError``."""
    try:
        return dict(zip(names, run()))
    except Exception as exc:
        if out_of_memory(exc):
            raise
        # torchvision's legacy two-stage exports reshape [0, -1] when the RPN keeps no
        # proposal, and onnxruntime refuses that.
        raise BadImageError(
            "the detector's own graph cannot run on this image (onnxruntime: "
            f"{str(exc).splitlines()[0][:300]}); a two-stage detector's export "
            "fails so where its RPN keeps no proposal") from exc


def graph_detections(values: dict[str, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's boxes, scores, labels and sources from its decoded outputs."""
    boxes, scores, labels, sources = (values[name][0] for name in DECODED_OUTPUTS)
    return boxes, scores, labels, sources


class Explainer:
    """Runs one bundle. Loading is the expensive part: keep one per process."""

    def __init__(
        self,
        bundle: str | Path | bytes,
        device: str = "auto",
        threads: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_memory: int = 0,
    ) -> None:
        """``max_memory`` (bytes, 0: none) refuses a bundle that needs more to run a
        batch (``bundle_checks.check_memory``), before any session is made; its
        sessions then give memory back after each run."""
        read = read_bundle(bundle)
        self.info: BundleInfo = read.info
        if max_memory:
            batch = read.info.batch_size or DEFAULT_BATCH[resolve_device(device)]
            check_memory(onnx.load_from_string(read.data), batch, max_memory, read.name)
        self.sessions = Sessions(bundle, read.data, read.info, device, threads,
                                 arena=not max_memory)
        self.device = self.sessions.device
        self.limits = limits
        log.info("loaded bundle (%s, layer %s) on %s", self.info.source_format,
                 self.info.target_layer, self.device)

    def prepare(self, images: Any) -> np.ndarray:
        """Anything ``explain`` accepts -> uint8 [N, H, W, C] at the bundle's size."""
        return prepare(images, self.info, self.limits)

    def method(self, name: str) -> Method:
        """The method ``name``, if this bundle can run it (else BadMethodError)."""
        return method_for(self.info, name)

    def explain(
        self,
        images: Any,
        targets: Any = None,
        method: str = "gradcam",
        batch_size: int | None = None,
        *,
        samples: int = MethodOptions.samples,
        noise: float = MethodOptions.noise,
        steps: int = MethodOptions.steps,
        seed: int = MethodOptions.seed,
        eigen_smooth: bool = MethodOptions.eigen_smooth,
        threshold: float = DEFAULT_THRESHOLD,
        max_detections: int = MAX_DETECTIONS,
        progress: Callable[[float], None] | None = None,
    ) -> Explanation:
        """Explain ``images`` for ``targets`` (None: each image's top-1 class).

        ``targets`` is one target for every image or one entry per image, each a target
        or a list of them (``onnxcam.engine.targets``): a class number or label,
        ``"all-positive"`` (classes whose probability is over ``threshold``),
        ``"top:k"``, ``Contrast``, ``Region`` or ``Weighting``. The result has a row per
        image and target. ``samples`` and ``noise`` tune smoothgrad, ``steps``
        integrated-gradients, ``seed`` smoothgrad's noise and randomcam's weights;
        ``eigen_smooth`` makes a CAM method's map the first principal component of its
        channel terms (pytorch-grad-cam's). ``progress`` is told how many images are done as they
        finish, in fractions inside an image for the slow methods (Score-CAM).

        A detection bundle's rows are detections (``Explanation.detections``), picked as
        ultralytics' predict picks them (``engine.detections``), at most
        ``max_detections`` per image: None explains every one, a class its detections,
        ``"top:k"`` the k best.
        """
        cam = method_for(self.info, method, eigen_smooth)
        options = MethodOptions(samples, noise, steps, seed, eigen_smooth)
        images = as_image_list(images)
        wanted = parse_targets(targets, len(images), self.info)
        results = [self.run_batch(batch, wanted[start : start + len(batch)], cam, options, start,
                                  progress, threshold, max_detections)
                   for start, batch in self._batches(images, batch_size or
                                                     DEFAULT_BATCH[self.device])]
        return self._explanation(results, cam)

    def run_batch(
        self, batch: np.ndarray, targets: np.ndarray | list[list[Target]], cam: Method,
        options: MethodOptions | None = None, first_index: int = 0,
        progress: Callable[[float], None] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        max_detections: int = MAX_DETECTIONS,
    ) -> BatchResult:
        """The method's maps for a prepared uint8 batch.

        ``targets`` are int64 classes (-1: top-1), one per image, or each image's
        targets as ``parse_targets`` returns them; ``first_index`` is the batch's first
        image's position in the whole call; ``progress`` as in ``explain``.
        One plain class per image takes one run of the whole bundle. Several targets
        of an image run the trunk once and the part after the layer once per target,
        where the bundle allows it, else the image once per target. A detector's targets
        are its detections (``targets.detection_rows``).
        """
        told = 0.0

        def tell(images: float) -> None:
            nonlocal told
            told += images
            if progress is not None:
                progress(images)

        items: list[list[Target]] = ([[int(t)] for t in targets]
                                     if isinstance(targets, np.ndarray) else targets)
        batch = np.ascontiguousarray(batch)
        options = options or MethodOptions()
        if self.info.detector:
            result = self._run_detections(batch, items, cam, options, first_index, tell,
                                          max_detections)
        elif plain(items, self.info):
            classes = np.array([each[0] for each in items], np.int64)
            result = self._run_whole(batch, classes, cam, options, first_index, tell)
        elif self.sessions.can_cut and cam.reads_layers_only():
            result = self._run_cut(batch, items, cam, options, first_index, threshold)
        else:
            result = self._run_repeated(batch, items, cam, options, first_index, tell,
                                        threshold)
        tell(len(batch) - told)
        result.first_index = first_index
        if result.image_logits is None:
            result.image_logits = result.logits
        return result

    def _run_whole(self, batch: np.ndarray, classes: np.ndarray, cam: Method,
                   options: MethodOptions, first_index: int, tell: Callable[[float], None],
                   weights: np.ndarray | None = None, rows: list[Row] | None = None
                   ) -> BatchResult:
        """One run of the whole bundle, a row per image of ``batch``: ``classes`` (-1:
        top-1), or ``weights`` (``targets.seeds``) as the seed; ``rows`` name them."""
        names = cam.output_names(self.info)
        feeds = {INPUT_IMAGE: batch, INPUT_TARGET: classes}
        if weights is not None:
            feeds[INPUT_TARGET_WEIGHTS] = weights
        outputs = dict(zip(names, self.sessions.run(names, feeds)))
        logits = outputs[OUTPUT_LOGITS]
        if rows is None:
            chosen = np.where(classes < 0, class_scores(logits, self.info).argmax(axis=1),
                              classes).astype(np.int64)
        else:
            chosen = np.array([r.cls for r in rows], np.int64)
        context = MethodContext(outputs, self.info, chosen,
                                ModelAccess(self.sessions, batch, tell), options, first_index,
                                self._layout(), weights,
                                None if rows is None else np.array([r.image for r in rows]))
        result = cam.explain(context)
        return BatchResult(result.raw, logits, chosen, result.layer_maps, result.signed,
                           None if rows is None else np.array([r.image for r in rows]),
                           None if rows is None else [r.name for r in rows])

    def _run_cut(self, batch: np.ndarray, items: list[list[Target]], cam: Method,
                 options: MethodOptions, first_index: int, threshold: float) -> BatchResult:
        """The trunk once for the batch, then the part after the layers once per row."""
        values = self._run_trunk(batch)
        logits = values[OUTPUT_LOGITS]
        rows = resolve(items, logits, self.info, threshold)
        if not rows:
            return self._no_rows(cam, logits)
        return self._run_head(batch, rows, values, cam, options, first_index)

    def _run_trunk(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The trunk's outputs for the batch: the logits, (a detector's) boxes, and what
        the part after the layers reads."""
        trunk, _ = self.sessions.cut()
        names = [o.name for o in trunk.get_outputs()]
        return dict(zip(names, trunk.run(names, {INPUT_IMAGE: batch})))

    def _run_head(self, batch: np.ndarray, rows: list[Row], values: dict[str, np.ndarray],
                  cam: Method, options: MethodOptions, first_index: int) -> BatchResult:
        """The part after the layers on the trunk's ``values``, a row per target, in
        chunks of ``HEAD_CHUNK`` rows."""
        _, head = self.sessions.cut()
        logits = values[OUTPUT_LOGITS]
        index = np.array([r.image for r in rows])
        wanted = [name for name in cam.output_names(self.info)
                  if name.partition(".")[0] in LAYER_OUTPUTS]
        from_head = [name for name in wanted if name not in values]
        chunks = []
        for start in range(0, len(rows), HEAD_CHUNK) if from_head else ():
            chunk = rows[start : start + HEAD_CHUNK]
            images = index[start : start + HEAD_CHUNK]
            feeds = {h.name: values[h.name][images] if h.batched else values[h.name]
                     for h in self.info.head_inputs if h.name != SEED}
            feeds[SEED] = seeds(chunk, logits)
            chunks.append(head.run(from_head, feeds))
        outputs = {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(from_head)}
        outputs.update({name: values[name][index] for name in wanted if name in values})
        return self._explain_rows(batch, rows, outputs, logits, cam, options, first_index)

    def _explain_rows(self, batch: np.ndarray, rows: list[Row], outputs: dict[str, np.ndarray],
                      logits: np.ndarray, cam: Method, options: MethodOptions,
                      first_index: int) -> BatchResult:
        """The method on ``outputs``, a row per target, ``logits`` every image's."""
        index = np.array([r.image for r in rows])
        # No seeds in the context: methods that read the layers alone never read them.
        context = MethodContext({**outputs, OUTPUT_LOGITS: logits[index]}, self.info,
                                np.array([r.cls for r in rows], np.int64),
                                ModelAccess(self.sessions, batch[index]), options, first_index,
                                self._layout(), None, index)
        result = cam.explain(context)
        return BatchResult(result.raw, logits[index], context.targets, result.layer_maps,
                           result.signed, index, [r.name for r in rows], image_logits=logits)

    def _run_detections(self, batch: np.ndarray, items: list[list[Target]], cam: Method,
                        options: MethodOptions, first_index: int,
                        tell: Callable[[float], None], max_detections: int) -> BatchResult:
        """A detector: its detections from one run (the trunk's, where the bundle is cut
        and the method reads the layers alone; chosen by onnxcam from an anchors bundle's
        raw output, or the graph's own), then a row per detection the targets pick:
        through the levels' local heads, through the part after the layers, or else the
        whole bundle once per row. A bundle explained per level then keeps each row's
        map at its own level's layer (``levels``)."""
        decoding = self.info.output == OUTPUT_DETECTIONS
        local = has_local_heads(self.info) and cam.reads_layers_only() and not decoding
        cut = self.sessions.can_cut and cam.reads_layers_only() and not local \
            and not decoding
        at_seed = self.sessions.at_seed() if decoding and cam.reads_layers_only() else None
        result: BatchResult | None = None
        if at_seed is not None:
            check_max_detections(max_detections)
            logits, rows, result = self._run_at_seed(at_seed, batch, items, cam, options,
                                                     first_index, max_detections)
        elif decoding:
            check_max_detections(max_detections)
            logits, found = self._decoded(batch, max_detections)
            values = {OUTPUT_LOGITS: logits}
            rows = picked_rows(items, found)
        else:
            if cut:
                values = self._run_trunk(batch)
            else:
                names = [OUTPUT_LOGITS, OUTPUT_BOXES, *(
                    [e.output(OUTPUT_ACTIVATIONS) for e in self.info.layers] if local else [])]
                values = dict(zip(names, self.sessions.run(names, {
                    INPUT_IMAGE: batch, INPUT_TARGET: np.full(len(batch), -1, np.int64)})))
            logits = values[OUTPUT_LOGITS]
            check_outputs(logits, values[OUTPUT_BOXES], self.info)
            check_coverage(self.info, logits.shape[-1])
            rows = detection_rows(items, logits, values[OUTPUT_BOXES], self.info,
                                  max_detections)
        if result is not None:
            pass
        elif not rows:
            result = self._no_rows(cam, logits)
        elif local:
            result = self._run_levels(batch, rows, values, cam, options, first_index)
        elif cut:
            result = self._run_head(batch, rows, values, cam, options, first_index)
        else:
            index = np.array([r.image for r in rows])
            result = self._run_whole(batch[index], np.array([r.cls for r in rows], np.int64),
                                     cam, options, first_index, tell, seeds(rows, logits), rows)
        if rows and self.info.levels and not local and cam.per_layer():
            result.raw, result.layer_maps = own_level_maps(result.layer_maps, rows,
                                                           self.info), {}
        result.detections = [r.detection for r in rows if r.detection is not None]
        # A row's logits: its anchor's class scores [K], not the image's [K, A] again.
        result.logits = logits[np.array([r.image for r in rows], np.int64), :,
                               np.array([d.anchor for d in result.detections], np.int64)]
        result.image_logits = logits
        return result

    def _run_levels(self, batch: np.ndarray, rows: list[Row], values: dict[str, np.ndarray],
                    cam: Method, options: MethodOptions, first_index: int) -> BatchResult:
        """Each row at its own level's layer, its gradients from that level's local
        head; maps resized to the finest level's grid, levels differing in resolution."""
        info = self.info
        index = np.array([r.image for r in rows])
        classes = np.array([r.cls for r in rows], np.int64)
        raw = np.zeros((len(rows), *finest_grid(info)), np.float32)
        # Grad-CAM reads only weights and cam; methods that read the gradient maps get
        # them a chunk of rows at a time (300 detections of 8 images would be GBs).
        chunk = len(rows) if set(cam.outputs) <= {OUTPUT_CAM, OUTPUT_WEIGHTS} else HEAD_CHUNK
        for level in info.levels:
            entry = entry_of(info, level)
            maps = values[entry.output(OUTPUT_ACTIVATIONS)]
            at_level = rows_of(level, rows)
            for start in range(0, len(at_level), chunk):
                mine = at_level[start:start + chunk]
                outputs = local_outputs(self.sessions, level, maps, [rows[i] for i in mine],
                                        cam.outputs)
                context = MethodContext(outputs, info, classes[mine],
                                        ModelAccess(self.sessions, batch[index[mine]]), options,
                                        first_index, entry.activation_layout, None, index[mine])
                raw[mine] = resize_maps(cam.explain_layer(context).raw, *raw.shape[1:])
        return BatchResult(raw, values[OUTPUT_LOGITS][index], classes, {}, None, index,
                           [r.name for r in rows])

    def _decoded(self, batch: np.ndarray, max_detections: int
                 ) -> tuple[np.ndarray, list[list[Detection]]]:
        """A detector that decodes its own: every image's logits [N, K, A] and its
        detections, the graph's, run one image at a time (their counts differ)."""
        names = [OUTPUT_LOGITS, *DECODED_OUTPUTS]
        logits, found = [], []
        for image in batch:
            values = own_graph(partial(self.sessions.forward, names, image), names)
            logits.append(values[OUTPUT_LOGITS])
            found.append(decoded(*graph_detections(values), self.info, max_detections))
        return joined_logits(logits), found

    def _run_at_seed(self, cut: SeedCut, batch: np.ndarray, items: list[list[Target]],
                     cam: Method, options: MethodOptions, first_index: int,
                     max_detections: int) -> tuple[np.ndarray, list[Row], BatchResult]:
        """A detector that decodes its own, for a method that reads the layers alone:
        each image's forward pass once (its detections, its activations and every
        tensor the backward pass reads), then the backward pass alone once per
        detection its targets pick. The logits, the rows and their maps."""
        wanted = [name for name in cam.output_names(self.info)
                  if name.partition(".")[0] in LAYER_OUTPUTS]
        backward = [name for name in wanted if name in cut.targets]
        forward = [name for name in wanted if name not in cut.targets]
        names = list(dict.fromkeys([OUTPUT_LOGITS, *DECODED_OUTPUTS, *forward, *cut.boundary]))
        logits: list[np.ndarray] = []
        rows: list[Row] = []
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        for position, image in enumerate(batch):
            values = own_graph(partial(cut.forward.run, names, {INPUT_IMAGE: image[None]}),
                               names)
            logits.append(values[OUTPUT_LOGITS])
            found = decoded(*graph_detections(values), self.info, max_detections)
            mine = [replace(r, image=position) for r in picked_rows([items[position]],
                                                                    [found])]
            for row in mine:
                feeds = {name: values[name] for name in cut.boundary}
                feeds[SEED] = seeds([row], values[OUTPUT_LOGITS])
                for name, value in zip(backward, cut.backward.run(backward, feeds)):
                    outputs[name].append(value)
                for name in forward:
                    outputs[name].append(values[name])
            rows += mine
        joined = joined_logits(logits)
        if not rows:
            return joined, rows, self._no_rows(cam, joined)
        return joined, rows, self._explain_rows(
            batch, rows, {name: np.concatenate(v) for name, v in outputs.items()}, joined, cam,
            options, first_index)

    def _run_repeated(self, batch: np.ndarray, items: list[list[Target]], cam: Method,
                      options: MethodOptions, first_index: int,
                      tell: Callable[[float], None], threshold: float) -> BatchResult:
        """Each image run once per target: for bundles that cannot be cut at the layer
        and for methods that run the model again."""
        logits = self.predict(batch)
        rows = resolve(items, logits, self.info, threshold)
        weighted = any(r.weights is not None for r in rows)
        if weighted and not self.info.weighted:
            raise BadTargetError("this bundle explains single classes only (it takes no "
                                 "target_weights: re-export it with this onnxcam; bundles "
                                 "with finite-difference gradients take classes only)")
        if not rows:
            return self._no_rows(cam, logits)
        index = np.array([r.image for r in rows])
        classes = np.array([max(r.cls, 0) for r in rows], np.int64)
        result = self._run_whole(batch[index], classes, cam, options, first_index, tell,
                                 seeds(rows, logits) if weighted else None, rows)
        result.image_logits = logits
        return result

    def _no_rows(self, cam: Method, logits: np.ndarray) -> BatchResult:
        """A batch none of whose images had a target (``all-positive`` found none)."""
        size = (self.info.height, self.info.width) if cam.input_resolution else (1, 1)
        layers = {e.name: np.zeros((0, 1, 1), np.float32)
                  for e in self.info.layers} if cam.per_layer() else {}
        signed = (np.zeros((0, *size, self.info.channels), np.float32)
                  if cam.input_resolution else None)
        return BatchResult(np.zeros((0, *size), np.float32), logits[:0],
                           np.zeros(0, np.int64), layers, signed, np.zeros(0, np.int64), [],
                           image_logits=logits)

    def _layout(self) -> Any:
        return activation_layout(self.info.activation_layout, self.info.activation_grid)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, K] for a prepared uint8 batch; no map is computed."""
        feeds = {INPUT_IMAGE: np.ascontiguousarray(batch),
                 INPUT_TARGET: np.full(len(batch), -1, np.int64)}
        return self.sessions.run([OUTPUT_LOGITS], feeds)[0]

    def _batches(self, images: Any, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Prepared batches by first index; files for batch i+1 decode while batch i runs."""
        if isinstance(images, np.ndarray):
            batch = check_batch(images, self.info, self.limits)
            for start in range(0, len(batch), size):
                yield start, batch[start : start + size]
            return
        items = list(images)
        starts = range(0, len(items), size)
        for start, batch in prefetched(starts, lambda s: self.prepare(items[s : s + size])):
            yield start, batch

    def _explanation(self, results: list[BatchResult], cam: Method) -> Explanation:
        info = self.info
        image_logits = [r.image_logits for r in results if r.image_logits is not None]
        results = [r for r in results if r.rows] or results[:1]

        def joined(values: list[np.ndarray], *empty: int) -> np.ndarray:
            return np.concatenate(values) if values else np.zeros(empty, np.float32)

        size = (info.height, info.width) if cam.input_resolution else (1, 1)
        raw = joined([r.raw for r in results], 0, *size)
        signed = None
        if cam.input_resolution:
            signed = joined([r.input_gradients for r in results if r.input_gradients is not None],
                            0, info.height, info.width, info.channels)
        return Explanation(
            heatmaps=to_heatmaps(raw, info.height, info.width),
            raw=raw,
            targets=joined([r.targets for r in results], 0).astype(np.int64),
            logits=joined([r.logits for r in results], 0, info.num_classes),
            info=info,
            method=cam.name,
            layer_maps={name: np.concatenate([r.layer_maps[name] for r in results])
                        for name in (results[0].layer_maps if results else {})},
            input_gradients=signed,
            image_index=joined([r.images() for r in results], 0).astype(np.int64),
            target_names=[name for r in results for name in r.names(info)],
            image_logits=joined_logits(image_logits) if image_logits else
            np.zeros((0, info.num_classes), np.float32),
            detections=[d for r in results for d in r.detections or []],
        )

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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_LOGITS,
    BundleInfo,
    activation_layout,
    read_bundle,
)
from onnxcam.bundle_checks import check_memory
from onnxcam.engine.images import (
    DEFAULT_LIMITS,
    Limits,
    as_image_list,
    check_batch,
    check_targets,
    prepare,
)
from onnxcam.engine.maps import flat as flat_maps
from onnxcam.engine.maps import heatmaps as to_heatmaps
from onnxcam.engine.methods import Method, MethodContext, MethodOptions, method_for
from onnxcam.engine.model_access import ModelAccess
from onnxcam.engine.prefetch import prefetched
from onnxcam.engine.sessions import Sessions
from onnxcam.runtime import resolve_device
from onnxcam.scores import probabilities

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 8, "cuda": 64}

__all__ = ["DEFAULT_BATCH", "BatchResult", "Explainer", "Explanation", "method_for"]


@dataclass
class Explanation:
    """What ``Explainer.explain`` returns, one row per image."""

    heatmaps: np.ndarray  # float32 [N, H, W] in [0, 1] at the model's input size
    # float32 [N, h, w]: the method's map at layer resolution, after ReLU (gradient
    # methods: [N, H, W] at input resolution)
    raw: np.ndarray
    targets: np.ndarray  # int64 [N]: the classes explained
    logits: np.ndarray  # float32 [N, K]
    info: BundleInfo  # the bundle explained, for its labels
    method: str
    # The raw map at every exported layer, early to late, by layer name (empty for
    # methods whose map does not depend on a layer, such as saliency).
    layer_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # Gradient methods: the signed per-channel image behind the map, float32
    # [N, H, W, C] (see each method); None for CAM methods.
    input_gradients: np.ndarray | None = None

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
        """float32 [N, K] by the bundle's head: a softmax over the classes, or a sigmoid
        per class (a multi-label head, whose rows need not sum to 1)."""
        return probabilities(self.logits, self.info.head).astype(np.float32)

    def top(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """Per image, the k best classes as ``{class, label, score}`` (score: probability,
        by the head; a sigmoid head ranks each class on its own probability)."""
        probabilities = self.probabilities
        # Ranked by the logits, as the top-1 target is: probabilities that round to
        # a tie in float32 must not put another class first.
        order = np.argsort(-self.logits, axis=1, kind="stable")[:, :k]
        return [
            [{"class": int(c), "label": self.info.label(int(c)), "score": float(row[c])}
             for c in classes]
            for row, classes in zip(probabilities, order)
        ]

    def label(self, index: int) -> str:
        return self.info.label(index)


@dataclass
class BatchResult:
    """One batch's maps: the primary one, per layer, and a gradient method's image."""

    raw: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    layer_maps: dict[str, np.ndarray]
    input_gradients: np.ndarray | None = None


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
        progress: Callable[[float], None] | None = None,
    ) -> Explanation:
        """Explain ``images`` for ``targets`` (None: each image's top-1 class).

        ``samples`` and ``noise`` tune smoothgrad, ``steps`` integrated-gradients.
        ``progress`` is told how many images are done as they finish, in fractions
        inside an image for the slow methods (Score-CAM).
        """
        cam = self.method(method)
        options = MethodOptions(samples, noise, steps, seed)
        images = as_image_list(images)
        wanted = check_targets(targets, len(images), self.info)
        results = [self.run_batch(batch, wanted[start : start + len(batch)], cam, options, start,
                                  progress)
                   for start, batch in self._batches(images, batch_size or
                                                     DEFAULT_BATCH[self.device])]
        return self._explanation(results, cam)

    def run_batch(
        self, batch: np.ndarray, targets: np.ndarray, cam: Method,
        options: MethodOptions | None = None, first_index: int = 0,
        progress: Callable[[float], None] | None = None,
    ) -> BatchResult:
        """One session run for a prepared uint8 batch, and the method's maps from it.

        ``targets`` are int64 (-1: top-1); ``first_index`` is the batch's first
        image's position in the whole call; ``progress`` as in ``explain``.
        """
        told = 0.0

        def tell(images: float) -> None:
            nonlocal told
            told += images
            if progress is not None:
                progress(images)

        names = cam.output_names(self.info)
        batch = np.ascontiguousarray(batch)
        outputs = dict(zip(names, self.sessions.run(names, {INPUT_IMAGE: batch,
                                                             INPUT_TARGET: targets})))
        logits = outputs[OUTPUT_LOGITS]
        chosen = np.where(targets < 0, logits.argmax(axis=1), targets).astype(np.int64)
        access = ModelAccess(self.sessions, batch, tell)
        context = MethodContext(outputs, self.info, chosen, access, options or MethodOptions(),
                                first_index,
                                activation_layout(self.info.activation_layout,
                                                  self.info.activation_grid))
        result = cam.explain(context)
        tell(len(batch) - told)
        return BatchResult(result.raw, logits, chosen, result.layer_maps, result.signed)

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
        )

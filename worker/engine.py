"""The explain engine: bundles and images in, heatmaps out, on onnxruntime alone.

Only the outputs a method needs leave the session (for Grad-CAM: the in-graph
``cam`` and the logits). Images given as files are decoded in a thread pool while
the previous batch runs, and every step works on whole batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_LOGITS,
    BundleInfo,
    read_bundle_info,
    split_at_model_input,
)
from worker.errors import BadMethodError, BadTargetError, BundleError
from worker.images import DEFAULT_LIMITS, Limits, load_image, resize
from worker.maps import heatmaps as to_heatmaps
from worker.methods import CamMethod, LayerMaps, get_method
from worker.runtime import make_session

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
SCORECAM_BATCH = 32


@dataclass
class Explanation:
    """What ``Explainer.explain`` returns, one row per image."""

    heatmaps: np.ndarray  # float32 [N, H, W] in [0, 1] at the model's input size
    raw: np.ndarray  # float32 [N, h, w]: the method's map at layer resolution, after ReLU
    targets: np.ndarray  # int64 [N]: the classes explained
    logits: np.ndarray  # float32 [N, K]
    labels: list[str]
    method: str

    @property
    def probabilities(self) -> np.ndarray:
        shifted = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)

    def top(self, k: int = 5) -> list[list[dict[str, Any]]]:
        """Per image, the k best classes as ``{class, label, score}`` (score: probability)."""
        probabilities = self.probabilities
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            [{"class": int(c), "label": self.label(int(c)), "score": float(row[c])}
             for c in classes]
            for row, classes in zip(probabilities, order)
        ]

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


class Explainer:
    """Runs one bundle. Loading is the expensive part: keep one per process."""

    def __init__(
        self,
        bundle: str | Path | bytes,
        device: str = "auto",
        threads: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        label = "bundle" if isinstance(bundle, bytes) else str(bundle)
        # Kept for Score-CAM, which re-reads the file lazily; bytes stay the caller's.
        self._bundle = bundle
        try:
            self.session, self.device = make_session(_read_bundle(bundle), device, threads)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{label}: not an onnxcam bundle (onnxruntime cannot load it: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from exc
        try:
            self.info: BundleInfo = read_bundle_info(self.session)
        except BundleError as exc:
            raise BundleError(f"{label}: {exc}") from exc
        names = {i.name for i in self.session.get_inputs()}
        if names != {INPUT_IMAGE, INPUT_TARGET}:
            raise BundleError(f"bundle inputs are {sorted(names)}, expected image and target")
        self.limits = limits
        self.threads = threads
        self.use_io_binding = self.device == "cuda"
        self._scoring: tuple[Any, Any] | None = None
        log.info("loaded bundle (%s, layer %s) on %s", self.info.source_format,
                 self.info.target_layer, self.device)

    # -- inputs --

    def prepare(self, images: Any) -> np.ndarray:
        """Anything ``explain`` accepts -> uint8 [N, H, W, C] at the bundle's size."""
        images = as_image_list(images)
        if isinstance(images, np.ndarray):
            return self._check_batch(images)
        return np.stack([self.prepare_one(image) for image in images]) if len(images) else \
            np.zeros((0, self.info.height, self.info.width, self.info.channels), np.uint8)

    def prepare_one(self, image: Any) -> np.ndarray:
        info = self.info
        array = load_image(image, info.channels, self.limits)
        return resize(array, info.height, info.width, info.resize)

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        """A 4-D batch as is when it fits the bundle, else converted image by image."""
        info = self.info
        if batch.dtype == np.uint8 and batch.shape[1:] == (info.height, info.width,
                                                          info.channels):
            return batch
        return np.stack([self.prepare_one(image) for image in batch]) if len(batch) else \
            np.zeros((0, info.height, info.width, info.channels), np.uint8)

    def _targets(self, targets: Any, count: int) -> np.ndarray:
        if targets is None:
            return np.full(count, -1, np.int64)
        if np.isscalar(targets):
            targets = [targets] * count
        array = np.asarray(targets)
        if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer):
            raise BadTargetError(f"targets must be None, an int, or {count} ints")
        bad = array[(array < 0) | (array >= self.info.num_classes)]
        if bad.size:
            raise BadTargetError(f"target {int(bad[0])} is outside [0, {self.info.num_classes})")
        return array.astype(np.int64)

    # -- running --

    def method(self, name: str) -> CamMethod:
        return method_for(self.info, name)

    def explain(
        self,
        images: Any,
        targets: Any = None,
        method: str = "gradcam",
        batch_size: int | None = None,
    ) -> Explanation:
        """Explain ``images`` for ``targets`` (None: each image's top-1 class)."""
        cam = self.method(method)
        size = batch_size or DEFAULT_BATCH[self.device]
        raws, logits, chosen = [], [], []
        images = as_image_list(images)
        count = len(images)
        wanted = self._targets(targets, count)
        for start, batch in self._batches(images, size):
            raw, batch_logits, batch_targets = self.run_batch(
                batch, wanted[start : start + len(batch)], cam)
            raws.append(raw)
            logits.append(batch_logits)
            chosen.append(batch_targets)
        info = self.info
        raw = np.concatenate(raws) if raws else np.zeros((0, 1, 1), np.float32)
        return Explanation(
            heatmaps=to_heatmaps(raw, info.height, info.width),
            raw=raw,
            targets=np.concatenate(chosen) if chosen else np.zeros(0, np.int64),
            logits=np.concatenate(logits) if logits else np.zeros((0, info.num_classes),
                                                                  np.float32),
            labels=list(info.labels),
            method=cam.name,
        )

    def run_batch(
        self, batch: np.ndarray, targets: np.ndarray, cam: CamMethod
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One session run for a prepared uint8 batch: (raw maps, logits, targets)."""
        names = [OUTPUT_LOGITS, *cam.outputs]
        feeds = {INPUT_IMAGE: np.ascontiguousarray(batch), INPUT_TARGET: targets}
        if self.use_io_binding:
            values = self._run_bound(names, feeds)
        else:
            values = self.session.run(names, feeds)
        outputs = dict(zip(names, values))
        logits = outputs[OUTPUT_LOGITS]
        chosen = np.where(targets < 0, logits.argmax(axis=1), targets).astype(np.int64)
        maps = LayerMaps(outputs, self.info, chosen)
        if cam.name == "scorecam":
            maps.score_masked = self._masked_scorer(batch, chosen)
        return cam(maps), logits, chosen

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, K] for a prepared uint8 batch; no map is computed."""
        feeds = {INPUT_IMAGE: np.ascontiguousarray(batch),
                 INPUT_TARGET: np.full(len(batch), -1, np.int64)}
        if self.use_io_binding:
            return self._run_bound([OUTPUT_LOGITS], feeds)[0]
        return self.session.run([OUTPUT_LOGITS], feeds)[0]

    def _run_bound(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run through IO binding: inputs copied to the device once, and only the
        requested outputs copied back, with no intermediate host buffers."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def _batches(self, images: Any, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Prepared batches; files for batch i+1 decode while batch i runs."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            batch = self._check_batch(images)
            for start in range(0, len(batch), size):
                yield start, batch[start : start + size]
            return
        items = list(images)
        starts = list(range(0, len(items), size))
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = pool.submit(self.prepare, items[0:size]) if items else None
            for index, start in enumerate(starts):
                assert pending is not None
                batch = pending.result()
                if index + 1 < len(starts):
                    following = starts[index + 1]
                    pending = pool.submit(self.prepare, items[following : following + size])
                yield start, batch

    # -- Score-CAM's extra forward passes --

    def _masked_scorer(self, batch: np.ndarray, targets: np.ndarray) -> Any:
        front, back = self._scoring_sessions()
        (model_input,) = front.run(None, {INPUT_IMAGE: batch})
        nchw = self.info.layout == "nchw"

        def score(masks: np.ndarray) -> np.ndarray:
            scores = np.zeros(masks.shape[:2], np.float32)
            for n in range(len(masks)):
                if nchw:
                    masked = model_input[n][None] * masks[n][:, None]
                else:
                    masked = model_input[n][None] * masks[n][..., None]
                for start in range(0, len(masked), SCORECAM_BATCH):
                    chunk = masked[start : start + SCORECAM_BATCH].astype(np.float32)
                    (logits,) = back.run([OUTPUT_LOGITS], {self.info.model_input: chunk})
                    scores[n, start : start + len(chunk)] = logits[:, targets[n]]
            return scores

        return score

    def _scoring_sessions(self) -> tuple[Any, Any]:
        if self._scoring is None:
            import onnx

            front, back = split_at_model_input(
                onnx.load_from_string(_read_bundle(self._bundle)), self.info)
            self._scoring = (
                make_session(front.SerializeToString(), self.device, self.threads)[0],
                make_session(back.SerializeToString(), self.device, self.threads)[0],
            )
        return self._scoring


def method_for(info: BundleInfo, name: str) -> CamMethod:
    """The method ``name``, if bundles like ``info`` can run it."""
    method = get_method(name)
    if method.needs_gradient_map and not info.has_gradients:
        raise BadMethodError(
            f"{name} needs the full gradient map; this bundle was exported with "
            "finite differences (--gradient fd), which give Grad-CAM weights only"
        )
    return method


def as_image_list(images: Any) -> Any:
    """A 4-D array or a sequence of images as is; one image becomes a list of one."""
    if isinstance(images, np.ndarray):
        return images if images.ndim == 4 else [images]
    if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
        return [images]
    return images


def _read_bundle(bundle: str | Path | bytes) -> bytes:
    if isinstance(bundle, bytes):
        return bundle
    try:
        return Path(bundle).read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle}: cannot read the bundle ({exc.strerror or exc})") from exc

"""The explain engine: bundles and images in, heatmaps out, on onnxruntime alone.

Only the outputs a method needs leave the session (for Grad-CAM: the in-graph
``cam`` and the logits). Images given as files are decoded in a thread pool while
the previous batch runs, and every step works on whole batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    LAYER_OUTPUTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    BundleInfo,
    LayerEntry,
    keep_outputs,
    read_bundle_info,
    split_at_model_input,
)
from onnxcam.errors import BadMethodError, BadTargetError, BundleError
from onnxcam.runtime import make_session
from onnxcam.worker.images import DEFAULT_LIMITS, Limits, load_image, resize
from onnxcam.worker.maps import heatmaps as to_heatmaps
from onnxcam.worker.methods import CamMethod, InputMethod, LayerMaps, MethodOptions, get_method

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
SCORECAM_BATCH = 32
GRADIENT_BATCH = 32  # model inputs per run of the split-off gradient graph
# The export flag that adds each whole-network output, for error messages.
EXPORT_FLAGS = {OUTPUT_INPUT_GRADIENTS: "--input-gradients",
                OUTPUT_GUIDED_INPUT_GRADIENTS: "--guided"}


@dataclass
class Explanation:
    """What ``Explainer.explain`` returns, one row per image."""

    heatmaps: np.ndarray  # float32 [N, H, W] in [0, 1] at the model's input size
    # float32 [N, h, w]: the method's map at layer resolution, after ReLU (gradient
    # methods: [N, H, W] at input resolution)
    raw: np.ndarray
    targets: np.ndarray  # int64 [N]: the classes explained
    logits: np.ndarray  # float32 [N, K]
    labels: list[str]
    method: str
    # The raw map at every exported layer, early to late, by layer name (empty for
    # methods whose map does not depend on a layer, such as saliency).
    layer_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # Gradient methods: the signed per-channel image behind the map, float32
    # [N, H, W, C] (see each method); None for CAM methods.
    input_gradients: np.ndarray | None = None

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
            session, self.device = make_session(_read_bundle(bundle), device, threads)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{label}: not an onnxcam bundle (onnxruntime cannot load it: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from exc
        try:
            self.info: BundleInfo = read_bundle_info(session)
        except BundleError as exc:
            raise BundleError(f"{label}: {exc}") from exc
        names = {i.name for i in session.get_inputs()}
        if names != {INPUT_IMAGE, INPUT_TARGET}:
            raise BundleError(f"bundle inputs are {sorted(names)}, expected image and target")
        self.limits = limits
        self.threads = threads
        self.use_io_binding = self.device == "cuda"
        self._splits: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._outputs = [o.name for o in session.get_outputs()]
        # Sessions by the input-gradient outputs they keep. A bundle with whole-network
        # gradients gives its full session up: most calls need neither backward pass,
        # and holding both graphs would double the memory; it is rebuilt when asked for.
        self._sessions: dict[frozenset[str], Any] = {}
        if not self.info.input_gradients:
            self._sessions[frozenset()] = session
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
        *,
        samples: int = MethodOptions.samples,
        noise: float = MethodOptions.noise,
        steps: int = MethodOptions.steps,
        seed: int = MethodOptions.seed,
    ) -> Explanation:
        """Explain ``images`` for ``targets`` (None: each image's top-1 class).

        ``samples`` and ``noise`` tune smoothgrad, ``steps`` integrated-gradients.
        """
        cam = self.method(method)
        options = MethodOptions(samples, noise, steps, seed)
        size = batch_size or DEFAULT_BATCH[self.device]
        results: list[BatchResult] = []
        images = as_image_list(images)
        count = len(images)
        wanted = self._targets(targets, count)
        for start, batch in self._batches(images, size):
            results.append(self.run_batch(batch, wanted[start : start + len(batch)], cam,
                                          options, start))
        return self._explanation(results, cam)

    def _explanation(self, results: list[BatchResult], cam: CamMethod) -> Explanation:
        info = self.info
        size = (info.height, info.width) if cam.input_resolution else (1, 1)
        raw = np.concatenate([r.raw for r in results]) if results else \
            np.zeros((0, *size), np.float32)
        layer_maps = {name: np.concatenate([r.layer_maps[name] for r in results])
                      for name in (results[0].layer_maps if results else {})}
        signed = None
        if cam.input_resolution:
            signed = np.concatenate([r.input_gradients for r in results if
                                     r.input_gradients is not None]) if results else \
                np.zeros((0, info.height, info.width, info.channels), np.float32)
        return Explanation(
            heatmaps=to_heatmaps(raw, info.height, info.width),
            raw=raw,
            targets=np.concatenate([r.targets for r in results]) if results else
            np.zeros(0, np.int64),
            logits=np.concatenate([r.logits for r in results]) if results else
            np.zeros((0, info.num_classes), np.float32),
            labels=list(info.labels),
            method=cam.name,
            layer_maps=layer_maps,
            input_gradients=signed,
        )

    def run_batch(
        self, batch: np.ndarray, targets: np.ndarray, cam: CamMethod,
        options: MethodOptions | None = None, first_index: int = 0,
    ) -> BatchResult:
        """One session run for a prepared uint8 batch, and the method's maps from it.

        ``first_index`` is the batch's first image's position in the whole call.
        """
        options = options or MethodOptions()
        layers = self.info.layers if cam.per_layer() else []
        names = self._output_names(cam, layers)
        feeds = {INPUT_IMAGE: np.ascontiguousarray(batch), INPUT_TARGET: targets}
        session = self._session_for(names)
        if self.use_io_binding:
            values = self._run_bound(session, names, feeds)
        else:
            values = session.run(names, feeds)
        outputs = dict(zip(names, values))
        logits = outputs[OUTPUT_LOGITS]
        chosen = np.where(targets < 0, logits.argmax(axis=1), targets).astype(np.int64)
        maps = LayerMaps(outputs, self.info, chosen, options=options, first_index=first_index)
        if cam.name == "scorecam":
            maps.score_masked = self._masked_scorer(batch, chosen)
        if cam.split_outputs:
            maps.model_input = self._model_input(batch)
            maps.gradients_at = self._gradients_at
        by_layer = {entry.name: self._apply(cam, self._layer_view(maps, entry))
                    for entry in layers}
        primary = next((by_layer[e.name] for e in layers if e.index == 0), None)
        if primary is None:
            primary = self._apply(cam, maps)
        if isinstance(cam, InputMethod):
            signed, raw = primary
            return BatchResult(raw, logits, chosen, {k: v[1] for k, v in by_layer.items()},
                               signed.astype(np.float32))
        return BatchResult(primary, logits, chosen, by_layer)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, K] for a prepared uint8 batch; no map is computed."""
        names = [OUTPUT_LOGITS]
        feeds = {INPUT_IMAGE: np.ascontiguousarray(batch),
                 INPUT_TARGET: np.full(len(batch), -1, np.int64)}
        session = self._session_for(names)
        if self.use_io_binding:
            return self._run_bound(session, names, feeds)[0]
        return session.run(names, feeds)[0]

    @staticmethod
    def _output_names(cam: CamMethod, layers: list[LayerEntry]) -> list[str]:
        names = [OUTPUT_LOGITS]
        for name in cam.outputs:
            names += [e.output(name) for e in layers] if name in LAYER_OUTPUTS else [name]
        return list(dict.fromkeys(names))

    @staticmethod
    def _apply(cam: CamMethod, maps: LayerMaps) -> Any:
        """A CAM method's map, or a gradient method's (signed image, map)."""
        return cam.attribute(maps) if isinstance(cam, InputMethod) else cam(maps)

    @staticmethod
    def _layer_view(maps: LayerMaps, entry: LayerEntry) -> LayerMaps:
        """``maps`` as if ``entry`` were the only layer: its outputs under plain names."""
        if entry.index == 0 and entry.layout == maps.info.activation_layout:
            return maps
        outputs = dict(maps.outputs)
        for name in LAYER_OUTPUTS:
            if entry.output(name) in maps.outputs:
                outputs[name] = maps.outputs[entry.output(name)]
        return replace(maps, outputs=outputs,
                       info=replace(maps.info, activation_layout=entry.layout))

    def _session_for(self, names: list[str]) -> Any:
        """A session that computes ``names``, pruned of the whole-network gradients nobody
        asked for (onnxruntime runs every node of a graph, whatever the requested outputs)."""
        kept = frozenset(self.info.input_gradients) & frozenset(names)
        if kept not in self._sessions:
            import onnx

            dropped = set(self.info.input_gradients) - kept
            model = keep_outputs(onnx.load_from_string(_read_bundle(self._bundle)),
                                 [name for name in self._outputs if name not in dropped])
            self._sessions[kept] = make_session(model.SerializeToString(), self.device,
                                                self.threads)[0]
        return self._sessions[kept]

    @staticmethod
    def _run_bound(session: Any, names: list[str],
                   feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run through IO binding: inputs copied to the device once, and only the
        requested outputs copied back, with no intermediate host buffers."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
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

    # -- extra passes through the model alone: Score-CAM, SmoothGrad, integrated gradients --

    def _model_input(self, batch: np.ndarray) -> np.ndarray:
        front, _ = self._split((OUTPUT_LOGITS,))
        (model_input,) = front.run(None, {INPUT_IMAGE: batch})
        return np.asarray(model_input, np.float32)

    def _masked_scorer(self, batch: np.ndarray, targets: np.ndarray) -> Any:
        _, back = self._split((OUTPUT_LOGITS,))
        model_input = self._model_input(batch)
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

    def _gradients_at(self, model_inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Input gradients [M, H, W, C] at model inputs of the bundle's own layout."""
        _, back = self._split((OUTPUT_INPUT_GRADIENTS,))
        chunks = []
        for start in range(0, len(model_inputs), GRADIENT_BATCH):
            feeds = {self.info.model_input: np.ascontiguousarray(
                         model_inputs[start : start + GRADIENT_BATCH], np.float32),
                     INPUT_TARGET: targets[start : start + GRADIENT_BATCH]}
            (gradients,) = back.run([OUTPUT_INPUT_GRADIENTS], feeds)
            chunks.append(gradients)
        return np.concatenate(chunks)

    def _split(self, outputs: tuple[str, ...]) -> tuple[Any, Any]:
        """Sessions for the bundle cut at its model input (see ``split_at_model_input``),
        built once per set of back-half outputs."""
        if outputs not in self._splits:
            import onnx

            front, back = split_at_model_input(
                onnx.load_from_string(_read_bundle(self._bundle)), self.info, outputs)
            self._splits[outputs] = (
                make_session(front.SerializeToString(), self.device, self.threads)[0],
                make_session(back.SerializeToString(), self.device, self.threads)[0],
            )
        return self._splits[outputs]


@dataclass
class BatchResult:
    """One batch's maps: the primary one, per layer, and a gradient method's image."""

    raw: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    layer_maps: dict[str, np.ndarray]
    input_gradients: np.ndarray | None = None


def method_for(info: BundleInfo, name: str) -> CamMethod:
    """The method ``name``, if bundles like ``info`` can run it."""
    method = get_method(name)
    if method.needs_gradient_map and not info.has_gradients:
        raise BadMethodError(
            f"{name} needs the full gradient map; this bundle was exported with "
            "finite differences (--gradient fd), which give Grad-CAM weights only"
        )
    for output in method.needed_input_gradients():
        if output not in info.input_gradients:
            raise BadMethodError(f"{name} needs the bundle output {output!r}; export the "
                                 f"bundle with {EXPORT_FLAGS[output]}")
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

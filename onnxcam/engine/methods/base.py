"""The shared base of every method, after pytorch-grad-cam's ``base_cam.py``.

The engine calls ``method.explain(context)`` and nothing else. The bases own what
is common: which outputs to ask the bundle for, one map per exported layer, the
ReLU, and making a gradient method's map from its signed image. A method overrides
exactly one hook of one base:

- ``ChannelWeightCam.weights(context) -> [N, C]`` (Grad-CAM++, XGrad-CAM, Score-CAM);
- ``CamMethod.cam(context) -> [N, h, w]`` before the ReLU (LayerCAM, HiResCAM,
  Eigen-CAM, and Grad-CAM, whose weighted sum the bundle computes in its graph);
- ``GradientMethod.attribute(context) -> [N, H, W, C]``, a signed image whose map is
  max over channels of its absolute value (keras-vis' saliency);
- ``SampledGradientMethod.copies(context, index) -> [S, ...]``, moved copies of one
  model input whose gradients are averaged (SmoothGrad).

Activations and gradients reach methods as NCHW, whatever the bundle's layout, so
formulas read as in pytorch-grad-cam. A transformer's token layer [N, T, C] reaches
them as its grid [N, C, h, w], the leading (class, distillation) tokens dropped, as
pytorch-grad-cam's ``reshape_transform`` does. Normalising and resizing belong to ``maps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from onnxcam.bundle import (
    LAYER_OUTPUTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    BundleInfo,
    LayerEntry,
)
from onnxcam.engine.methods.projections import first_component
from onnxcam.engine.model_access import ModelAccess
from onnxcam.layout import ActivationLayout, Layout


@dataclass(frozen=True)
class MethodOptions:
    """Knobs of the gradient methods that sample (SmoothGrad, integrated gradients)."""

    samples: int = 25  # SmoothGrad: noisy copies per image
    noise: float = 0.15  # SmoothGrad: noise std over (max - min) of the model input
    steps: int = 32  # integrated gradients: points on the path from the baseline
    # SmoothGrad's noise and Random-CAM's weights: image i's from default_rng([seed, i])
    seed: int = 0
    # The CAM methods: the first principal component of the channel terms, not their sum.
    eigen_smooth: bool = False


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may read for one batch, as if one layer were exported."""

    outputs: dict[str, np.ndarray]  # the bundle outputs asked for, by plain name
    info: BundleInfo
    targets: np.ndarray  # int64 [N]: the classes explained, top-1 already resolved
    model: ModelAccess  # for methods that run the model again
    options: MethodOptions = MethodOptions()
    first_index: int = 0  # the position of this batch's first image in the whole call
    layout: ActivationLayout = Layout.NCHW  # how this layer's activations lie
    # float32 [N, ...one image's logits]: each row's weighting of the logits, where the
    # target is not a plain class (None: one-hot ``targets``).
    seeds: np.ndarray | None = None
    # Each row's image by its position in the batch, where rows are not the images.
    images: np.ndarray | None = None

    def image_number(self, row: int) -> int:
        """Row ``row``'s image by its position in the whole call (SmoothGrad's noise is
        drawn per image, so that batching and several targets change nothing)."""
        local = row if self.images is None else int(self.images[row])
        return self.first_index + local

    @property
    def activations(self) -> np.ndarray:
        """The layer's activations, NCHW [N, C, h, w]."""
        return self.layout.to_nchw(self.outputs[OUTPUT_ACTIVATIONS])

    @property
    def gradients(self) -> np.ndarray:
        """d logit[target] / d activations, NCHW [N, C, h, w]."""
        return self.layout.to_nchw(self.outputs[OUTPUT_GRADIENTS])

    def seed(self, index: int) -> np.ndarray | None:
        """Row ``index``'s weighting of the logits, or None for a plain class."""
        return None if self.seeds is None else self.seeds[index]

    def for_layer(self, entry: LayerEntry) -> MethodContext:
        """This context with ``entry``'s outputs under the plain names."""
        outputs = dict(self.outputs)
        for name in LAYER_OUTPUTS:
            if entry.output(name) in self.outputs:
                outputs[name] = self.outputs[entry.output(name)]
        return replace(self, outputs=outputs, layout=entry.activation_layout)


@dataclass
class MethodResult:
    """One batch's maps: the primary one, per layer, and a gradient method's image."""

    raw: np.ndarray  # float32 [N, h, w] after the ReLU; gradient methods: [N, H, W]
    signed: np.ndarray | None = None  # gradient methods: float32 [N, H, W, C]
    layer_maps: dict[str, np.ndarray] = field(default_factory=dict)  # early to late


class Method:
    """What the engine sees of every method: its needs, declared, and ``explain``."""

    name: ClassVar[str]
    # Bundle outputs it reads; the per-layer ones are asked for at every exported layer.
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS)
    # Whole-network outputs it reads through ``context.model`` (the split bundle).
    split_outputs: ClassVar[tuple[str, ...]] = ()
    # Whether it needs the full gradient map, which fd bundles do not have.
    needs_gradient_map: ClassVar[bool] = True
    # Whether its map is at the model input's resolution, with a signed image.
    input_resolution: ClassVar[bool] = False
    # Whether it runs the model again through ``context.model`` (Score-CAM).
    reruns_model: ClassVar[bool] = False

    @classmethod
    def reads_layers_only(cls) -> bool:
        """Whether the layers' outputs are all it reads: then the bundle cut at its
        layers serves many targets per image with one run of the trunk."""
        return (not cls.split_outputs and not cls.reruns_model
                and all(name in LAYER_OUTPUTS for name in cls.outputs))

    @classmethod
    def per_layer(cls) -> bool:
        """Whether the map depends on the layer: one map per exported layer."""
        return any(name in LAYER_OUTPUTS for name in cls.outputs)

    @classmethod
    def needed_input_gradients(cls) -> tuple[str, ...]:
        """The whole-network outputs the bundle must have for this method."""
        return tuple(dict.fromkeys(
            name for name in (*cls.outputs, *cls.split_outputs)
            if name in (OUTPUT_INPUT_GRADIENTS, OUTPUT_GUIDED_INPUT_GRADIENTS)))

    def output_names(self, info: BundleInfo) -> list[str]:
        """What the session must return: the logits and ``outputs`` at every layer."""
        layers = info.layers if self.per_layer() else []
        names = [OUTPUT_LOGITS]
        for name in self.outputs:
            names += [e.output(name) for e in layers] if name in LAYER_OUTPUTS else [name]
        return list(dict.fromkeys(names))

    def explain(self, context: MethodContext) -> MethodResult:
        """The map at every exported layer; the primary one is ``target_layer``'s."""
        if not self.per_layer():
            return self.explain_layer(context)
        by_layer = {entry.name: self.explain_layer(context.for_layer(entry))
                    for entry in context.info.layers}
        primary = next(by_layer[e.name] for e in context.info.layers if e.index == 0)
        return MethodResult(primary.raw, primary.signed,
                            {name: result.raw for name, result in by_layer.items()})

    def explain_layer(self, context: MethodContext) -> MethodResult:
        """The map for the one layer ``context`` holds (each base defines it)."""
        raise NotImplementedError


class CamMethod(Method):
    """A map at layer resolution: override ``cam``, and ``terms`` where ``eigen_smooth``
    applies (``smoothable``); the base applies the ReLU."""

    # Whether ``eigen_smooth`` changes the map: not for the methods whose
    # pytorch-grad-cam class ignores it (the projections, FEM).
    smoothable: ClassVar[bool] = True

    def cam(self, context: MethodContext) -> np.ndarray:
        """[N, h, w] before the ReLU."""
        raise NotImplementedError

    def terms(self, context: MethodContext) -> np.ndarray:
        """[N, C, h, w]: the channel terms whose sum is ``cam``."""
        raise NotImplementedError

    def explain_layer(self, context: MethodContext) -> MethodResult:
        if context.options.eigen_smooth and self.smoothable:
            terms = self.terms(context).astype(np.float64)
            cam = first_component(np.nan_to_num(terms, nan=0.0))
        else:
            cam = self.cam(context)
        return MethodResult(np.maximum(cam, 0).astype(np.float32))


class ChannelWeightCam(CamMethod):
    """A weighted sum of the activation channels: override ``weights``."""

    def weights(self, context: MethodContext) -> np.ndarray:
        """Per-image channel weights [N, C]."""
        raise NotImplementedError

    def cam(self, context: MethodContext) -> np.ndarray:
        # Plain einsum loops, not BLAS (see ``worker.maps.resize_maps``).
        return np.einsum("nk,nkhw->nhw", self.weights(context), context.activations)

    def terms(self, context: MethodContext) -> np.ndarray:
        return self.weights(context)[:, :, None, None] * context.activations


class GradientMethod(Method):
    """A signed image at the model input's resolution: override ``attribute``."""

    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_INPUT_GRADIENTS,)
    needs_gradient_map = False
    input_resolution = True

    def attribute(self, context: MethodContext) -> np.ndarray:
        """The signed image, NHWC [N, H, W, C]."""
        raise NotImplementedError

    def explain_layer(self, context: MethodContext) -> MethodResult:
        signed = self.attribute(context).astype(np.float32)
        return MethodResult(saliency_map(signed), signed)


class SampledGradientMethod(GradientMethod):
    """The mean gradient over moved copies of each model input: override ``copies``.

    The map is the mean of the copies' saliency maps, not the saliency of the mean
    gradient, so this base makes both itself.
    """

    outputs = ()
    split_outputs = (OUTPUT_INPUT_GRADIENTS,)

    def copies(self, context: MethodContext, index: int) -> np.ndarray:
        """Copies [S, ...] of image ``index``'s model input (the model's layout)."""
        raise NotImplementedError

    def explain_layer(self, context: MethodContext) -> MethodResult:
        signed, maps = [], []
        for n in range(len(context.targets)):
            copies = self.copies(context, n)
            gradients = context.model.gradients_at(copies, context.targets[n],
                                                   context.seed(n))
            signed.append(gradients.mean(axis=0))
            maps.append(saliency_map(gradients).mean(axis=0))
        return MethodResult(np.stack(maps).astype(np.float32),
                            np.stack(signed).astype(np.float32))


def saliency_map(image: np.ndarray) -> np.ndarray:
    """keras-vis' saliency: max over channels of |image| [N, H, W, C] -> [N, H, W]."""
    return np.abs(image).max(axis=-1).astype(np.float32)

"""The shared base of every method.

A CAM method turns what the bundle returned into one map per image at layer
resolution (``weigh``); the base applies the ReLU. Normalising and resizing belong
to the engine. Activations and gradients reach methods as NCHW, whatever the
bundle's layout, so formulas read as in pytorch-grad-cam.

A gradient method (``InputMethod``) works at the model input's resolution: it
overrides ``attribute``, which gives a signed per-channel image [N, H, W, C] and
its map [N, H, W], usually max over channels of |image| (keras-vis' saliency).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxcam.bundle import (
    LAYER_OUTPUTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    BundleInfo,
)


@dataclass(frozen=True)
class MethodOptions:
    """Knobs of the gradient methods that sample (SmoothGrad, integrated gradients)."""

    samples: int = 25  # SmoothGrad: noisy copies per image
    noise: float = 0.15  # SmoothGrad: noise std over (max - min) of the model input
    steps: int = 32  # integrated gradients: points on the path from the baseline
    seed: int = 0  # SmoothGrad: image i's noise comes from default_rng([seed, i])


@dataclass
class LayerMaps:
    """One batch of bundle outputs, with the pieces methods read."""

    outputs: dict[str, np.ndarray]
    info: BundleInfo
    targets: np.ndarray
    # For methods that run more forward passes (Score-CAM): masks [N, C, H, W] in
    # [0, 1] at input resolution -> target scores [N, C].
    score_masked: Callable[[np.ndarray], np.ndarray] | None = None
    # For methods that move the model input (SmoothGrad, integrated gradients): the
    # batch's preprocessed model input, in the model's layout, and a function from
    # such inputs and their targets to input gradients [M, H, W, C], batched inside.
    model_input: np.ndarray | None = None
    gradients_at: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    options: MethodOptions = MethodOptions()
    first_index: int = 0  # the position of this batch's first image in the whole call

    def _nchw(self, name: str) -> np.ndarray:
        value = self.outputs[name]
        return value.transpose(0, 3, 1, 2) if self.info.activation_layout == "nhwc" else value

    @property
    def activations(self) -> np.ndarray:
        return self._nchw(OUTPUT_ACTIVATIONS)

    @property
    def gradients(self) -> np.ndarray:
        return self._nchw(OUTPUT_GRADIENTS)

    @property
    def input_gradients(self) -> np.ndarray:
        """d logit / d model input, NHWC [N, H, W, C]."""
        return self.outputs[OUTPUT_INPUT_GRADIENTS]

    @property
    def guided_input_gradients(self) -> np.ndarray:
        """Guided backprop's input gradients, NHWC [N, H, W, C]."""
        return self.outputs[OUTPUT_GUIDED_INPUT_GRADIENTS]

    def model_input_nhwc(self) -> np.ndarray:
        assert self.model_input is not None
        if self.info.layout == "nchw":
            return self.model_input.transpose(0, 2, 3, 1)
        return self.model_input


class CamMethod:
    """Base class: subclasses set ``name`` and ``outputs`` and override ``weigh``."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS)
    # Whether it needs the full gradient map, which fd bundles do not have.
    needs_gradient_map: ClassVar[bool] = True
    # Whether its map is at the model input's resolution (see ``InputMethod``).
    input_resolution: ClassVar[bool] = False
    # Whole-network outputs it needs from a split of the bundle at its model input.
    split_outputs: ClassVar[tuple[str, ...]] = ()

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

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        """[N, h, w] before the ReLU."""
        raise NotImplementedError

    def __call__(self, maps: LayerMaps) -> np.ndarray:
        return np.maximum(self.weigh(maps), 0).astype(np.float32)


def weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """sum_k weights[n, k] * activations[n, k]: the CAM of per-channel weights.

    Plain einsum loops, not BLAS (see ``worker.maps.resize_maps``)."""
    return np.einsum("nk,nkhw->nhw", weights, activations)


class InputMethod(CamMethod):
    """Base of the gradient methods: maps at the model input's resolution."""

    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_INPUT_GRADIENTS,)
    needs_gradient_map = False
    input_resolution = True

    def attribute(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        """The signed image [N, H, W, C] and the map [N, H, W]."""
        raise NotImplementedError

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        return self.attribute(maps)[1]


def saliency_map(image: np.ndarray) -> np.ndarray:
    """keras-vis' saliency: max over channels of |image| [N, H, W, C] -> [N, H, W]."""
    return np.abs(image).max(axis=-1).astype(np.float32)

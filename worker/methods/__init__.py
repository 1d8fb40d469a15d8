"""The CAM and gradient methods, one module each, by the names users pass as ``method``."""

from __future__ import annotations

from onnxcam.bundle import OUTPUT_GUIDED_INPUT_GRADIENTS, OUTPUT_INPUT_GRADIENTS, BundleInfo
from onnxcam.errors import BadMethodError
from onnxcam.worker.methods.base import (
    CamMethod,
    ChannelWeightCam,
    GradientMethod,
    Method,
    MethodContext,
    MethodOptions,
    MethodResult,
    SampledGradientMethod,
)
from onnxcam.worker.methods.eigencam import EigenCAM
from onnxcam.worker.methods.gradcam import GradCAM
from onnxcam.worker.methods.gradcam_plus_plus import GradCAMPlusPlus
from onnxcam.worker.methods.guided_backprop import GuidedBackprop
from onnxcam.worker.methods.guided_gradcam import GuidedGradCAM
from onnxcam.worker.methods.hirescam import HiResCAM
from onnxcam.worker.methods.integrated_gradients import IntegratedGradients
from onnxcam.worker.methods.layercam import LayerCAM
from onnxcam.worker.methods.saliency import Saliency
from onnxcam.worker.methods.scorecam import ScoreCAM
from onnxcam.worker.methods.smoothgrad import SmoothGrad
from onnxcam.worker.methods.xgradcam import XGradCAM

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, EigenCAM, ScoreCAM,
                Saliency, SmoothGrad, GuidedBackprop, GuidedGradCAM, IntegratedGradients)
}
# The export flag that adds each whole-network output, for error messages.
EXPORT_FLAGS = {OUTPUT_INPUT_GRADIENTS: "--input-gradients",
                OUTPUT_GUIDED_INPUT_GRADIENTS: "--guided"}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise BadMethodError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


def method_for(info: BundleInfo, name: str) -> Method:
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


__all__ = [
    "EXPORT_FLAGS",
    "METHODS",
    "CamMethod",
    "ChannelWeightCam",
    "GradientMethod",
    "Method",
    "MethodContext",
    "MethodOptions",
    "MethodResult",
    "SampledGradientMethod",
    "get_method",
    "method_for",
]

"""The CAM and gradient methods, one module each, by the names users pass as ``method``."""

from __future__ import annotations

from onnxcam.bundle import OUTPUT_GUIDED_INPUT_GRADIENTS, OUTPUT_INPUT_GRADIENTS, BundleInfo
from onnxcam.engine.methods.base import (
    CamMethod,
    ChannelWeightCam,
    GradientMethod,
    Method,
    MethodContext,
    MethodOptions,
    MethodResult,
    SampledGradientMethod,
)
from onnxcam.engine.methods.eigencam import EigenCAM
from onnxcam.engine.methods.eigengradcam import EigenGradCAM
from onnxcam.engine.methods.fem import FEM
from onnxcam.engine.methods.gradcam import EigenSmoothedGradCAM, GradCAM
from onnxcam.engine.methods.gradcam_elementwise import GradCAMElementWise
from onnxcam.engine.methods.gradcam_plus_plus import GradCAMPlusPlus
from onnxcam.engine.methods.guided_backprop import GuidedBackprop
from onnxcam.engine.methods.guided_gradcam import GuidedGradCAM
from onnxcam.engine.methods.hirescam import HiResCAM
from onnxcam.engine.methods.integrated_gradients import IntegratedGradients
from onnxcam.engine.methods.kpca_cam import KPCACAM
from onnxcam.engine.methods.layercam import LayerCAM
from onnxcam.engine.methods.random_cam import RandomCAM
from onnxcam.engine.methods.saliency import Saliency
from onnxcam.engine.methods.scorecam import ScoreCAM
from onnxcam.engine.methods.smoothgrad import SmoothGrad
from onnxcam.engine.methods.xgradcam import XGradCAM
from onnxcam.errors import BadMethodError
from onnxcam.words import clipped

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, GradCAMElementWise,
                EigenCAM, EigenGradCAM, FEM, KPCACAM, RandomCAM, ScoreCAM, Saliency,
                SmoothGrad, GuidedBackprop, GuidedGradCAM, IntegratedGradients)
}
# The export flag that adds each whole-network output, for error messages.
EXPORT_FLAGS = {OUTPUT_INPUT_GRADIENTS: "--input-gradients",
                OUTPUT_GUIDED_INPUT_GRADIENTS: "--guided"}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]()
    except KeyError:
        raise BadMethodError(
            f"unknown method {clipped(name)!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


def method_for(info: BundleInfo, name: str, eigen_smooth: bool = False) -> Method:
    """The method ``name``, if bundles like ``info`` can run it (and, with
    ``eigen_smooth``, if it is a CAM method)."""
    method = get_method(name)
    if eigen_smooth:
        if not isinstance(method, CamMethod):
            raise BadMethodError(f"eigen_smooth applies to the CAM methods, not to {name}")
        if isinstance(method, GradCAM):
            method = EigenSmoothedGradCAM()
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

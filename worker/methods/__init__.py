"""The CAM and gradient methods, one module each, by the names users pass as ``method``."""

from __future__ import annotations

from onnxcam.errors import BadMethodError
from onnxcam.worker.methods.base import CamMethod, InputMethod, LayerMaps, MethodOptions
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

METHODS: dict[str, type[CamMethod]] = {
    cls.name: cls
    for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, EigenCAM, ScoreCAM,
                Saliency, SmoothGrad, GuidedBackprop, GuidedGradCAM, IntegratedGradients)
}


def get_method(name: str) -> CamMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise BadMethodError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "CamMethod", "InputMethod", "LayerMaps", "MethodOptions", "get_method"]

"""The CAM and gradient methods, one module each, by the names users pass as ``method``."""

from __future__ import annotations

from worker.errors import BadMethodError
from worker.methods.base import CamMethod, InputMethod, LayerMaps, MethodOptions
from worker.methods.eigencam import EigenCAM
from worker.methods.gradcam import GradCAM
from worker.methods.gradcam_plus_plus import GradCAMPlusPlus
from worker.methods.guided_backprop import GuidedBackprop
from worker.methods.guided_gradcam import GuidedGradCAM
from worker.methods.hirescam import HiResCAM
from worker.methods.integrated_gradients import IntegratedGradients
from worker.methods.layercam import LayerCAM
from worker.methods.saliency import Saliency
from worker.methods.scorecam import ScoreCAM
from worker.methods.smoothgrad import SmoothGrad
from worker.methods.xgradcam import XGradCAM

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

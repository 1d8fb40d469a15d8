"""The CAM methods, one module each, by the names users pass as ``method``."""

from __future__ import annotations

from worker.errors import BadMethodError
from worker.methods.base import CamMethod, LayerMaps
from worker.methods.eigencam import EigenCAM
from worker.methods.gradcam import GradCAM
from worker.methods.gradcam_plus_plus import GradCAMPlusPlus
from worker.methods.hirescam import HiResCAM
from worker.methods.layercam import LayerCAM
from worker.methods.scorecam import ScoreCAM
from worker.methods.xgradcam import XGradCAM

METHODS: dict[str, type[CamMethod]] = {
    cls.name: cls
    for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, EigenCAM, ScoreCAM)
}


def get_method(name: str) -> CamMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise BadMethodError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "CamMethod", "LayerMaps", "get_method"]

"""Independent float64 references for the CAM methods, shared by the method and
explainer tests: pytorch-grad-cam's definitions written out again in numpy, and
plain onnxruntime runs of bundles and source models. Nothing here imports
``onnxcam.engine``, so a defect there cannot leak into an expected value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def assert_maps_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    """Per image: |got - want| <= rtol * max|want| (+ a float32 floor)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    for n, (g, w) in enumerate(zip(got, want)):
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g.astype(np.float64) - w).max())
        assert err <= rtol * scale, f"image {n}: max error {err:.3g} vs scale {scale:.3g}"


def assert_projection_close(got: np.ndarray, projection: np.ndarray) -> None:
    """A projection's sign is its SVD's choice: each map must match the ReLU of one of
    its two signs."""
    for n in range(len(got)):
        candidates = [relu(projection[n]), relu(-projection[n])]
        best = int(np.argmin([float(np.abs(got[n] - c).max()) for c in candidates]))
        assert float(candidates[best].max()) > 0
        assert_maps_close(got[n][None], candidates[best][None], rtol=1e-4)


def assert_normalised_maps_match(got: np.ndarray, want: np.ndarray, tolerance: float,
                                 what: str) -> None:
    """Min-max normalised maps (``ref_normalize``) within ``tolerance``, and a good
    share of the expected ones not flat (a map all zero after its ReLU matches any other
    flat one; untrained, about half of a multi-label head's Grad-CAM maps are)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    error = np.abs(ref_normalize(got.astype(np.float64)) - ref_normalize(want)).max(axis=(1, 2))
    if os.environ.get("ONNXCAM_PRINT_ERRORS"):  # the figures for a closing note's table
        print(f"\nmap error {what}: {error.max():.1e} over {len(error)} maps")
    assert error.max() <= tolerance, f"{what}: rows {np.flatnonzero(error > tolerance)}"
    assert (want.max(axis=(1, 2)) > 0).mean() >= 0.25, f"{what}: most expected maps are flat"


def positive_findings(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, class) of every finding a sigmoid puts above 0.5 (logit > 0): image
    order, then each image's findings best first, as "all-positive" lists them."""
    rows = [(image, c) for image, row in enumerate(logits)
            for c in np.argsort(-row, kind="stable") if row[c] > 0]
    images, classes = zip(*rows)
    return np.array(images), np.array(classes)


def bundle_outputs(path: Path, images: np.ndarray, targets: np.ndarray,
                   names: Sequence[str] = ("logits", "activations", "gradients"),
                   ) -> dict[str, np.ndarray]:
    """Outputs straight from the bundle file (activations and gradients NCHW), float64."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names = list(names)
    values = dict(zip(names, session.run(names, {"image": images, "target": targets})))
    out = {k: v.astype(np.float64) for k, v in values.items()}
    if meta["onnxcam.activation_layout"] == "nhwc":
        for key in {"activations", "gradients"} & set(out):
            out[key] = out[key].transpose(0, 3, 1, 2)
    return out


# -- pytorch-grad-cam's definitions, written out again in float64 --


def cam_of(weights: np.ndarray, acts: np.ndarray) -> np.ndarray:
    return relu((weights[:, :, None, None] * acts).sum(axis=1))


def ref_gradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return cam_of(grads.mean(axis=(2, 3)), acts)


def ref_gradcam_pp_weights(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    g2 = grads**2
    g3 = g2 * grads
    sums = acts.sum(axis=(2, 3))[:, :, None, None]
    aij = g2 / (2 * g2 + sums * g3 + 1e-6)
    aij = np.where(grads != 0, aij, 0.0)
    return (relu(grads) * aij).sum(axis=(2, 3))


def ref_gradcam_pp(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return cam_of(ref_gradcam_pp_weights(acts, grads), acts)


def ref_xgradcam_weights(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    sums = acts.sum(axis=(2, 3))[:, :, None, None]
    return (grads * acts / (sums + 1e-7)).sum(axis=(2, 3))


def ref_xgradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return cam_of(ref_xgradcam_weights(acts, grads), acts)


def ref_layercam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return relu((relu(grads) * acts).sum(axis=1))


def ref_hirescam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return relu((grads * acts).sum(axis=1))


def ref_eigen_projection(acts: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection, before the ReLU (sign as the SVD gives it)."""
    projections = []
    for a in acts:
        c, h, w = a.shape
        matrix = a.reshape(c, -1).T  # [hw, C]
        matrix = matrix - matrix.mean(axis=0)
        _, _, vt = np.linalg.svd(matrix, full_matrices=True)
        projections.append((matrix @ vt[0]).reshape(h, w))
    return np.array(projections)


def ref_gradcam_elementwise(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return relu(relu(grads * acts).sum(axis=1))


def ref_fem(acts: np.ndarray, k: float = 2.0) -> np.ndarray:
    """FEM: each channel weighted by the share of its map over mean + k std."""
    cutoff = acts.mean(axis=(2, 3)) + k * acts.std(axis=(2, 3))
    return cam_of((acts > cutoff[:, :, None, None]).mean(axis=(2, 3)), acts)


def ref_kpca(acts: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection_kernel with its defaults: scikit-learn's
    KernelPCA (sigmoid kernel, one component) of each image's centred positions,
    before the ReLU."""
    from sklearn.decomposition import KernelPCA

    maps = []
    for a in acts:
        c, h, w = a.shape
        samples = a.reshape(c, -1).T
        samples = samples - samples.mean(axis=0)
        maps.append(KernelPCA(n_components=1, kernel="sigmoid").fit_transform(samples)
                    .reshape(h, w))
    return np.array(maps)


# pytorch-grad-cam's channel terms of each method eigen_smooth applies to: the map is
# their sum, or with eigen_smooth their first principal component (get_2d_projection).
EIGEN_TERMS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "gradcam": lambda a, g: g.mean(axis=(2, 3))[:, :, None, None] * a,
    "gradcam++": lambda a, g: ref_gradcam_pp_weights(a, g)[:, :, None, None] * a,
    "xgradcam": lambda a, g: ref_xgradcam_weights(a, g)[:, :, None, None] * a,
    "layercam": lambda a, g: relu(g) * a,
    "hirescam": lambda a, g: g * a,
    "gradcam-elementwise": lambda a, g: relu(g * a),
}


GRADIENT_REFS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "gradcam": ref_gradcam,
    "gradcam++": ref_gradcam_pp,
    "xgradcam": ref_xgradcam,
    "layercam": ref_layercam,
    "hirescam": ref_hirescam,
    "gradcam-elementwise": ref_gradcam_elementwise,
}


def align_corners_matrix(size_out: int, size_in: int) -> np.ndarray:
    """torch.nn.UpsamplingBilinear2d along one axis, via np.interp on unit vectors."""
    positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    grid = np.arange(size_in)
    return np.stack([np.interp(positions, grid, np.eye(size_in)[i]) for i in range(size_in)],
                    axis=1)


def ref_scorecam(
    acts: np.ndarray, model_input: np.ndarray, layout: str, targets: np.ndarray,
    source_logits: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """ScoreCAM.get_cam_weights: masks from upsampled activations, softmax of target scores."""
    n, c = acts.shape[:2]
    height, width = (model_input.shape[2:] if layout == "nchw" else model_input.shape[1:3])
    rows = align_corners_matrix(height, acts.shape[2])
    cols = align_corners_matrix(width, acts.shape[3])
    upsampled = np.einsum("hi,nkij,wj->nkhw", rows, acts, cols)
    lows = upsampled.min(axis=(2, 3), keepdims=True)
    highs = upsampled.max(axis=(2, 3), keepdims=True)
    masks = (upsampled - lows) / (highs - lows + 1e-8)
    scores = np.zeros((n, c))
    for i in range(n):
        if layout == "nchw":
            masked = model_input[i][None] * masks[i][:, None]
        else:
            masked = model_input[i][None] * masks[i][..., None]
        scores[i] = source_logits(masked.astype(np.float32))[:, targets[i]]
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights = shifted / shifted.sum(axis=1, keepdims=True)
    return cam_of(weights, acts)


def ref_normalize(raw: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image before the resize, without its 1e-7 added to
    the maximum (which swamps maps of tiny magnitude): (x - min) / (max - min), and
    zeros for an all-zero map (every pixel's ReLU off)."""
    out = raw - raw.min(axis=(1, 2), keepdims=True)
    top = out.max(axis=(1, 2), keepdims=True)
    return out / np.where(top > 0, top, 1.0)


def ref_resize_half_pixel(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR) one output pixel at a time (edge samples clamped)."""
    n, h, w = maps.shape
    out = np.zeros((n, height, width))

    def source(i: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        s = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
        low = int(np.floor(s))
        return low, min(low + 1, size_in - 1), s - low

    for y in range(height):
        y0, y1, fy = source(y, h, height)
        for x in range(width):
            x0, x1, fx = source(x, w, width)
            top = (1 - fx) * maps[:, y0, x0] + fx * maps[:, y0, x1]
            bottom = (1 - fx) * maps[:, y1, x0] + fx * maps[:, y1, x1]
            out[:, y, x] = (1 - fy) * top + fy * bottom
    return out


def source_outputs(model: onnx.ModelProto, names: Sequence[str]) -> Callable[..., list[np.ndarray]]:
    """Tensors ``names`` of a source ONNX model (NCHW input ``input``), any of them
    inner ones, as float64: (model input) -> [values]."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in present)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        values = session.run(list(names), {"input": np.asarray(x, np.float32)})
        return [np.asarray(v, np.float64) for v in values]

    return run

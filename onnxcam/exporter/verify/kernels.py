"""Reference kernels for onnx's ReferenceEvaluator: exact float64 versions of the ops
whose stock reference is missing, approximate, or too slow for a whole head."""

from __future__ import annotations

import math

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import Conv


class ChannelLRN(OpRun):
    """LRN across channels, as the ONNX spec defines it (onnx 1.23's reference
    implementation windows over the batch axis instead)."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha = 1e-4 if alpha is None else alpha
        beta = 0.75 if beta is None else beta
        bias = 1.0 if bias is None else bias
        channels = x.shape[1]
        below, above = (size - 1) // 2, size - 1 - (size - 1) // 2
        squares = x**2
        sums = np.zeros_like(x)
        for c in range(channels):
            sums[:, c] = squares[:, max(0, c - below) : min(channels, c + above + 1)].sum(axis=1)
        return ((x / (bias + alpha / size * sums) ** beta).astype(x.dtype),)


ChannelLRN.__name__ = "LRN"


class CeilMaxPool(OpRun):
    """MaxPool as the ONNX spec defines it, for 2-D NCHW maps: onnx 1.23's reference
    implementation gives padded ``ceil_mode`` windows one output too many (googlenet's
    inception branches then disagree in size and their Concat fails)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        if x.ndim != 4 or (auto_pad not in (None, "NOTSET", b"NOTSET")):
            raise NotImplementedError("MaxPool: only 2-D maps with explicit pads")
        kh, kw = kernel_shape
        sh, sw = strides or (1, 1)
        dh, dw = dilations or (1, 1)
        top, left, bottom, right = pads or (0, 0, 0, 0)
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        rounding = np.ceil if ceil_mode else np.floor
        out_h = int(rounding((x.shape[2] + top + bottom - span_h) / sh)) + 1
        out_w = int(rounding((x.shape[3] + left + right - span_w) / sw)) + 1
        if ceil_mode:  # a last window that starts in the bottom/right padding is dropped
            out_h -= (out_h - 1) * sh >= x.shape[2] + top
            out_w -= (out_w - 1) * sw >= x.shape[3] + left
        need_h, need_w = (out_h - 1) * sh + span_h, (out_w - 1) * sw + span_w
        padded = np.full(x.shape[:2] + (max(need_h, x.shape[2] + top),
                                        max(need_w, x.shape[3] + left)), -np.inf, x.dtype)
        padded[:, :, top:top + x.shape[2], left:left + x.shape[3]] = x
        windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), (2, 3))
        windows = windows[:, :, : need_h - span_h + 1 : sh, : need_w - span_w + 1 : sw,
                          ::dh, ::dw]
        return (windows.max(axis=(4, 5)).astype(x.dtype),)


CeilMaxPool.__name__ = "MaxPool"


class WindowAveragePool(OpRun):
    """AveragePool for 2-D NCHW maps, vectorised: onnx 1.23's reference loops over
    every output element in Python (VGG's 512x7x7 pool then takes minutes)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None,
             kernel_shape=None, pads=None, strides=None):
        if x.ndim != 4 or (auto_pad not in (None, "NOTSET", b"NOTSET")) or \
                any(d != 1 for d in dilations or ()):
            raise NotImplementedError("AveragePool: only undilated 2-D maps with explicit pads")
        pads = list(pads or (0, 0, 0, 0))
        ones = np.ones((1, 1) + x.shape[2:], x.dtype)
        # Sum over windows of zero-padded maps; divide by the elements each window covers:
        # inside the input, or also in the explicit pads (count_include_pad).
        padded_ones = np.pad(ones, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                             constant_values=1.0 if count_include_pad else 0.0)
        total = _window_reduce(np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]),
                                          (pads[1], pads[3]))), kernel_shape, strides,
                               ceil_mode, np.sum)
        count = _window_reduce(padded_ones, kernel_shape, strides, ceil_mode, np.sum)
        return ((total / count).astype(x.dtype),)


def _window_reduce(padded: np.ndarray, kernel: list[int], strides: list[int] | None,
                   ceil_mode: int | None, reduce: object) -> np.ndarray:
    """``reduce`` over each window of an already padded map; ``ceil_mode`` windows that
    overhang the bottom or right edge take what they cover (zeros beyond)."""
    kh, kw = kernel
    sh, sw = strides or (1, 1)
    rounding = np.ceil if ceil_mode else np.floor
    out_h = int(rounding((padded.shape[2] - kh) / sh)) + 1
    out_w = int(rounding((padded.shape[3] - kw) / sw)) + 1
    if ceil_mode:  # a window must start inside the padded map
        out_h -= (out_h - 1) * sh >= padded.shape[2]
        out_w -= (out_w - 1) * sw >= padded.shape[3]
    extra_h = max(0, (out_h - 1) * sh + kh - padded.shape[2])
    extra_w = max(0, (out_w - 1) * sw + kw - padded.shape[3])
    grown = np.pad(padded, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    windows = np.lib.stride_tricks.sliding_window_view(grown, (kh, kw), (2, 3))
    return reduce(windows[:, :, ::sh, ::sw][:, :, :out_h, :out_w], axis=(4, 5))  # type: ignore[operator]


WindowAveragePool.__name__ = "AveragePool"


class ExactErf(OpRun):
    """Erf in the input's precision (onnx 1.23's reference rounds it to float32, which
    puts float32 noise into every GELU of a float64 head)."""

    op_domain = ""
    _erf = np.vectorize(math.erf, otypes=[np.float64])

    def _run(self, x):
        return (self._erf(x).astype(x.dtype),)


ExactErf.__name__ = "Erf"


class ExactGelu(OpRun):
    """Gelu in the input's precision: onnx 1.23 has no reference Gelu and expands its
    function body, whose Erf is the float32 one ``ExactErf`` replaces elsewhere. That
    puts float32 noise into every MLP of a float64 transformer head, and float64
    differences of ViT-B's last block then misread its gradients by 20%."""

    op_domain = ""

    def _run(self, x, approximate=None):
        if approximate in ("tanh", b"tanh"):
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1 + ExactErf._erf(x / math.sqrt(2)))).astype(x.dtype),)


ExactGelu.__name__ = "Gelu"


class FlatMatMul(OpRun):
    """MatMul by a 2-D matrix as one 2-D product: numpy runs a stack of thin products
    ([17, 1, 768] @ [768, 2304], dynamo's ViT attention) without BLAS, 25 times slower,
    and a float64 ViT-B head then takes minutes."""

    op_domain = ""

    def _run(self, a, b):
        if a.ndim < 2 or b.ndim != 2:
            return (np.matmul(a, b),)
        flat = product(a.reshape(-1, a.shape[-1]), b)
        return (flat.reshape(*a.shape[:-1], b.shape[-1]),)


FlatMatMul.__name__ = "MatMul"


class WeightGemm(OpRun):
    """Gemm whose weight may stay float32 (``float64_head``), exact in float64."""

    op_domain = ""

    def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
        out = product(a.T if transA else a, b.T if transB else b)
        out *= 1.0 if alpha is None else alpha
        if c is not None and beta != 0:
            out = out + c * (1.0 if beta is None else beta)
        return (out.astype(a.dtype),)


WeightGemm.__name__ = "Gemm"

# Bytes of a float64 block of a float32 weight, in ``product``.
PRODUCT_BLOCK_BYTES = 64 << 20


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D arrays, in ``a``'s precision. A float32 ``b`` beside a float64
    ``a`` is widened a block of columns at a time (exactly: float32 to float64 loses
    nothing), never whole: VGG's first Dense weight is 800 MB in float64."""
    if b.dtype == a.dtype:
        return a @ np.ascontiguousarray(b)
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    step = max(1, PRODUCT_BLOCK_BYTES // (a.itemsize * max(1, b.shape[0])))
    for first in range(0, b.shape[1], step):
        out[:, first : first + step] = a @ b[:, first : first + step].astype(a.dtype)
    return out


class ExactLayerNormalization(OpRun):
    """LayerNormalization with its statistics in the input's precision: onnx 1.23's
    reference keeps them in float32 and refuses a double ``stash_type``."""

    op_domain = ""

    def _run(self, x, scale, bias=None, axis=None, epsilon=None, stash_type=None):
        first = (-1 if axis is None else axis) % x.ndim
        axes = tuple(range(first, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        inverse = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True)
                                + (1e-5 if epsilon is None else epsilon))
        normal = (x - mean) * inverse * scale
        if bias is not None:
            normal = normal + bias
        outputs = (normal.astype(x.dtype), mean.astype(x.dtype), inverse.astype(x.dtype))
        return outputs[: len(self.onnx_node.output)]


ExactLayerNormalization.__name__ = "LayerNormalization"


class DilatedConv(Conv):
    """A dilated 2-D Conv as a sum over its kernel taps: onnx's reference spreads the
    kernel out to its dilated span and im2cols by that, 15 GiB for DeepLabV3's rate-36
    ASPP branch on a 6 x 6 map. Other convs go the stock way."""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,  # noqa: N803
             kernel_shape=None, pads=None, strides=None):
        if X.ndim != 4 or not dilations or all(d == 1 for d in dilations) or \
                auto_pad not in (None, "NOTSET", b"NOTSET"):
            return super()._run(X, W, B, auto_pad, dilations, group, kernel_shape, pads,
                                strides)
        groups = group or 1
        (sh, sw), (dh, dw) = strides or (1, 1), dilations
        top, left, bottom, right = pads or (0, 0, 0, 0)
        padded = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right)))
        out_channels, per_group, kh, kw = W.shape
        out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
        grouped = W.reshape(groups, out_channels // groups, per_group, kh, kw)
        y = np.zeros((len(X), groups, out_channels // groups, out_h, out_w), X.dtype)
        for i in range(kh):
            for j in range(kw):
                patch = padded[:, :, i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
                               j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
                patch = patch.reshape(len(X), groups, per_group, out_h, out_w)
                y += np.einsum("ngcxy,gmc->ngmxy", patch, grouped[..., i, j], optimize=True)
        y = y.reshape(len(X), out_channels, out_h, out_w)
        return ((y if B is None else y + B.reshape(1, -1, 1, 1)).astype(X.dtype),)


DilatedConv.__name__ = "Conv"


class SeparableRoiAlign(OpRun):
    """RoiAlign (mode avg) as the ONNX spec defines it, vectorized: onnx's reference
    loops over every roi, channel, bin and sampling point in Python (minutes for a
    Faster R-CNN head). Bilinear sampling on a box's grid is separable: each bin is
    a [H] weighting along y times a [W] one along x, applied to the roi's map."""

    op_domain = ""

    def _run(self, X, rois, batch_indices, coordinate_transformation_mode=None, mode=None,
             output_height=None, output_width=None, sampling_ratio=None, spatial_scale=None):
        if mode not in (None, "avg", b"avg"):
            raise NotImplementedError("RoiAlign mode max")
        half = coordinate_transformation_mode in (None, "half_pixel", b"half_pixel")
        out_h, out_w = output_height or 1, output_width or 1
        scale, ratio = 1.0 if spatial_scale is None else spatial_scale, sampling_ratio or 0
        y = np.zeros((len(rois), X.shape[1], out_h, out_w), X.dtype)
        for r, (roi, n) in enumerate(zip(rois.astype(np.float64), batch_indices)):
            start_x, start_y, end_x, end_y = roi * scale - (0.5 if half else 0.0)
            along_y = _bin_weights(start_y, end_y, out_h, X.shape[2], ratio, half)
            along_x = _bin_weights(start_x, end_x, out_w, X.shape[3], ratio, half)
            y[r] = np.einsum("ph,chw,qw->cpq", along_y, X[int(n)], along_x, optimize=True)
        return (y,)


SeparableRoiAlign.__name__ = "RoiAlign"


def _bin_weights(start: float, end: float, bins: int, size: int, ratio: int,
                 half_pixel: bool) -> np.ndarray:
    """[bins, size]: each bin's average of bilinear weights over its sampling points
    along one axis (zero for points outside [-1, size])."""
    extent = end - start if half_pixel else max(end - start, 1.0)
    step = extent / bins
    samples = ratio if ratio > 0 else max(int(math.ceil(extent / bins)), 1)
    weights = np.zeros((bins, size))
    for b in range(bins):
        for i in range(samples):
            point = start + b * step + (i + 0.5) * step / samples
            if point < -1.0 or point > size:
                continue
            point = max(point, 0.0)
            low = int(point)
            if low >= size - 1:
                low = high = size - 1
                point = float(low)
            else:
                high = low + 1
            weights[b, low] += (1 - (point - low)) / samples
            weights[b, high] += (point - low) / samples
    return weights


class IndexedScatterElements(OpRun):
    """ScatterElements (reductions none and add) by numpy indexing: onnx's reference
    walks every element in Python (two minutes a run for the scatter that puts a
    Faster R-CNN's per-level RoiAlign rows back in order)."""

    op_domain = ""

    def _run(self, data, indices, updates, axis=None, reduction=None):
        if reduction not in (None, "none", b"none", "add", b"add"):
            raise NotImplementedError(f"ScatterElements reduction {reduction!r}")
        axis = (axis or 0) % data.ndim
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        out = data.copy()
        where = tuple(indices if a == axis else np.arange(n).reshape(
            [-1 if b == a else 1 for b in range(indices.ndim)]) for a, n in
            enumerate(indices.shape))
        if reduction in ("add", b"add"):
            np.add.at(out, where, updates)
        else:
            out[where] = updates
        return (out,)


IndexedScatterElements.__name__ = "ScatterElements"
REFERENCE_OPS = [ChannelLRN, CeilMaxPool, WindowAveragePool, ExactErf, ExactGelu,
                 ExactLayerNormalization, FlatMatMul, WeightGemm, DilatedConv,
                 SeparableRoiAlign, IndexedScatterElements]

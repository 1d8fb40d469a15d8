"""``Explainer.explain`` end to end: files, PIL images and arrays in, results that match
independent references, and every kind of bad input refused with a clear error from
``onnxcam.errors``."""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnx
import pytest
from cam_references import (
    GRADIENT_REFS,
    assert_maps_close,
    assert_projection_close,
    bundle_outputs,
    ref_eigen_projection,
    ref_fem,
    ref_gradcam,
    ref_kpca,
    ref_scorecam,
    relu,
    source_outputs,
)
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnxcam.runtime
from onnxcam.engine import Explainer, Explanation
from onnxcam.engine.images import Limits
from onnxcam.errors import (
    BadImageError,
    BadMethodError,
    BadTargetError,
    BundleError,
    MissingImageError,
)
from onnxcam.exporter import export
from onnxcam.exporter.preprocess import preprocess_numpy

LABELS = models.CNN_LABELS
GREY_SIZE = (20, 24)  # H, W of the 1-channel ONNX model: not square, on purpose
GRADIENT_MAP_METHODS = ["gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise",
                        "eigengradcam"]


# ------------------------------------------------------------------------------ models


def grey_onnx(seed: int = 0) -> onnx.ModelProto:
    """NCHW [N, 1, 20, 24] CNN: Conv-Relu-MaxPool-Conv-Relu (``feat``), GAP, Gemm -> 4 logits."""
    rng = np.random.default_rng(seed)
    height, width = GREY_SIZE

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0.0, scale, shape).astype(np.float32), name)

    inits = [
        init("c1.w", (6, 1, 3, 3), np.sqrt(2 / 9)), init("c1.b", (6,), 0.05),
        init("c2.w", (8, 6, 3, 3), np.sqrt(2 / 54)), init("c2.b", (8,), 0.05),
        init("fc.w", (4, 8), 3.0), init("fc.b", (4,), 0.1),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["feat"], name="last_relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "grey_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, height, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def rgb_bundle(cnn_bundle: Path) -> Path:
    return cnn_bundle


@pytest.fixture(scope="module")
def fd_bundle(folder: Path, cnn_source: Path) -> Path:
    out = folder / "rgb.fd.onnx"
    assert export(cnn_source, out, labels=LABELS, gradient="fd").info.gradient == "fd"
    return out


@pytest.fixture(scope="module")
def grey_bundle(folder: Path) -> Path:
    source = folder / "grey.onnx"
    onnx.save(grey_onnx(), str(source))
    out = folder / "grey.bundle.onnx"
    info = export(source, out).info
    assert (info.channels, info.height, info.width) == (1, *GREY_SIZE)
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, onnx.ModelProto]:
    """The source model of each bundle, for references that never touch a bundle."""
    return {"rgb": models.onnx_cnn(), "grey": grey_onnx()}


@pytest.fixture(scope="module")
def rgb(rgb_bundle: Path) -> Explainer:
    return Explainer(rgb_bundle, device="cpu")


@pytest.fixture(scope="module")
def grey(grey_bundle: Path) -> Explainer:
    return Explainer(grey_bundle, device="cpu")


@pytest.fixture(scope="module")
def fd(fd_bundle: Path) -> Explainer:
    return Explainer(fd_bundle, device="cpu")


@pytest.fixture(params=["rgb", "grey"])
def explainer(request: pytest.FixtureRequest) -> Explainer:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------ images


def picture(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (JPEG-friendly), in ``mode``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert(mode)


# name, mode, size (H, W), format: all of them differ from both bundles' sizes
FILES = [
    ("rgb_png", "RGB", (37, 29), "PNG"),
    ("grey_png", "L", (50, 64), "PNG"),
    ("rgb_jpeg", "RGB", (31, 45), "JPEG"),
    ("grey_jpeg", "L", (12, 9), "JPEG"),
    ("big_rgb_png", "RGB", (120, 90), "PNG"),
]


@pytest.fixture(scope="module")
def image_files(folder: Path) -> list[Path]:
    paths = []
    for index, (name, mode, (h, w), fmt) in enumerate(FILES):
        path = folder / f"{name}.{'png' if fmt == 'PNG' else 'jpg'}"
        picture(h, w, index, mode).save(path, format=fmt)
        paths.append(path)
    return paths


def resized(path_or_image: Path | Image.Image, explainer: Explainer) -> np.ndarray:
    """What the engine should feed the model: decode, convert, Pillow bilinear resize."""
    info = explainer.info
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image = image.convert("L" if info.channels == 1 else "RGB")
    array = np.asarray(image.resize((info.width, info.height), Image.Resampling.BILINEAR))
    return array.reshape(info.height, info.width, info.channels)


def assert_same(a: Explanation, b: Explanation, rtol: float = 1e-6) -> None:
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_allclose(a.logits, b.logits, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(a.raw, b.raw, rtol=rtol, atol=1e-6 * max(1.0, float(b.raw.max())))
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, rtol=rtol, atol=1e-5)


def check_shapes(result: Explanation, explainer: Explainer, count: int) -> None:
    info = explainer.info
    assert result.heatmaps.shape == (count, info.height, info.width)
    assert result.heatmaps.dtype == np.float32
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1
    assert result.raw.dtype == np.float32 and result.raw.ndim == 3 and len(result.raw) == count
    assert (result.raw >= 0).all()
    assert result.targets.shape == (count,)
    assert np.issubdtype(result.targets.dtype, np.integer)
    assert result.logits.shape == (count, info.num_classes)
    assert result.logits.dtype == np.float32


# ------------------------------------------------------------------------------ inputs


def test_files_equal_the_already_resized_arrays(explainer: Explainer,
                                                image_files: list[Path]) -> None:
    from_files = explainer.explain(image_files)
    check_shapes(from_files, explainer, len(image_files))
    batch = np.stack([resized(p, explainer) for p in image_files])
    assert batch.dtype == np.uint8
    assert_same(from_files, explainer.explain(batch))
    # str paths too
    assert_same(explainer.explain([str(p) for p in image_files]), from_files)


def test_list_of_pil_images(explainer: Explainer) -> None:
    images = [picture(30, 22, 1), picture(9, 40, 2, "L"), picture(25, 25, 3, "RGBA"),
              picture(16, 16, 4, "P"), picture(33, 17, 5, "CMYK")]
    result = explainer.explain(images)
    check_shapes(result, explainer, len(images))
    assert_same(result, explainer.explain(np.stack([resized(i, explainer) for i in images])))


def array_to_bundle(array: np.ndarray, explainer: Explainer) -> np.ndarray:
    """An independent reading of the array rules: round floats, drop alpha, convert, resize."""
    info = explainer.info
    a = np.clip(np.rint(array), 0, 255).astype(np.uint8) if array.dtype != np.uint8 else array
    a = a[..., None] if a.ndim == 2 else a[..., :3]
    if info.channels == 1 and a.shape[-1] == 3:
        weighted = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
        a = np.clip(np.rint(weighted), 0, 255).astype(np.uint8)[..., None]
    elif info.channels == 3 and a.shape[-1] == 1:
        a = np.concatenate([a, a, a], axis=-1)
    image = Image.fromarray(a[..., 0] if info.channels == 1 else a)
    out = np.asarray(image.resize((info.width, info.height), Image.Resampling.BILINEAR))
    return out.reshape(info.height, info.width, info.channels)


def test_list_of_arrays_of_any_size(explainer: Explainer) -> None:
    rng = np.random.default_rng(7)
    arrays = [
        rng.integers(0, 256, (23, 31, 3), dtype=np.uint8),
        rng.integers(0, 256, (40, 18), dtype=np.uint8),  # grey, 2-D
        rng.integers(0, 256, (12, 12, 1), dtype=np.uint8),  # grey, one channel
        rng.integers(0, 256, (19, 27, 4), dtype=np.uint8),  # RGBA
        rng.uniform(0, 255, (21, 26, 3)),  # floats in 0..255
    ]
    result = explainer.explain(arrays)
    check_shapes(result, explainer, len(arrays))
    expected = np.stack([array_to_bundle(a, explainer) for a in arrays])
    assert_same(result, explainer.explain(expected))


def test_arrays_at_the_bundle_size_equal_the_batch(explainer: Explainer) -> None:
    info = explainer.info
    batch = np.random.default_rng(3).integers(
        0, 256, (3, info.height, info.width, info.channels), dtype=np.uint8)
    assert_same(explainer.explain(list(batch)), explainer.explain(batch))


def test_float_batch_at_the_bundle_size_is_rounded(rgb: Explainer) -> None:
    batch = np.random.default_rng(4).uniform(0, 255, (2, 16, 16, 3))
    want = rgb.explain(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
    assert_same(rgb.explain(batch), want)


def skimage_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs, uint8 RGB (no download)."""
    import skimage.data

    return np.asarray(getattr(skimage.data, name)(), np.uint8)


def test_float_images_in_unit_range_mean_what_pytorch_grad_cam_users_mean(
        rgb: Explainer) -> None:
    """``np.float32(img) / 255`` is the same image as ``img``, as a batch, a list or
    one image (issue 12: it was rounded to 0 and 1, and called another class)."""
    photo = np.asarray(Image.fromarray(skimage_photo("coffee")).resize((16, 16)))
    other = np.asarray(Image.fromarray(skimage_photo("astronaut")).resize((16, 16)))
    batch = np.stack([photo, other])
    want = rgb.explain(batch)
    unit = batch.astype(np.float32) / 255
    assert_same(rgb.explain(unit), want)
    assert_same(rgb.explain(list(unit)), want)
    assert_same(rgb.explain(unit[0]), rgb.explain(batch[:1]))
    # the mistake the issue saw, for contrast: the same floats read as 0..255
    misread = rgb.explain(np.rint(unit).astype(np.uint8))
    assert np.abs(misread.heatmaps - want.heatmaps).max() > 0.05


def test_sixteen_bit_pixels_are_scaled_from_their_full_range(rgb: Explainer) -> None:
    """uint16 arrays (16-bit PNG or TIFF pixels) are 0..65535: x * 255 / 65535."""
    rng = np.random.default_rng(9)
    deep = rng.integers(0, 65536, (2, 16, 16, 3), dtype=np.uint16)
    want = np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
    assert_same(rgb.explain(deep), rgb.explain(want))
    assert_same(rgb.explain(list(deep)), rgb.explain(want))


def test_a_dark_image_in_a_float_batch_is_read_like_the_others(rgb: Explainer) -> None:
    """[0, 1] or 0..255 is judged over the whole batch, not image by image."""
    rng = np.random.default_rng(8)
    batch = rng.uniform(0, 255, (2, 16, 16, 3))
    batch[1] = rng.uniform(0, 0.9, (16, 16, 3))  # dark, but 0..255 like its neighbour
    want = rgb.explain(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
    assert_same(rgb.explain(batch), want)


@pytest.mark.parametrize(("values", "message"), [
    (np.full((16, 16, 3), -0.4, np.float32), "a normalised tensor?"),
    (np.full((16, 16, 3), 300.0), r"image values span \[300, 300\]"),
    (np.full((16, 16, 3), 4000, np.int32), "expected uint8, 0..255 or floats in"),
    (np.full((16, 16, 3), np.nan, np.float32), "finite numbers"),
    (np.ones((16, 16, 3), bool), "real numbers"),
])
def test_pixel_values_outside_any_image_range_are_refused(rgb: Explainer, values: np.ndarray,
                                                          message: str) -> None:
    for images in (values, [values], values[None]):
        with pytest.raises(BadImageError, match=message):
            rgb.explain(images)


def test_grey_batch_at_the_bundle_size_is_converted(rgb: Explainer) -> None:
    batch = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    assert_same(rgb.explain(batch), rgb.explain(list(batch)))


def single(form: str, path: Path, explainer: Explainer) -> Any:
    """One image, not in a list, in the form named."""
    return {"path": path, "str": str(path), "bytes": path.read_bytes(), "pil": Image.open(path),
            "array": resized(path, explainer),
            "grey_2d": resized(path, explainer).mean(axis=-1).round().astype(np.uint8),
            "missing": path.with_name("no_such_image.png"), "number": 7,
            "vector": np.zeros(7, np.uint8), "text_bytes": b"not an image"}[form]


@pytest.mark.parametrize("form", ["path", "str", "bytes", "pil", "array", "grey_2d"])
def test_a_single_image_is_one_image_or_a_clear_error(rgb: Explainer, image_files: list[Path],
                                                      form: str) -> None:
    """One image is explained as a list of one; a single bad one raises its own error."""
    image = single(form, image_files[0], rgb)
    result = rgb.explain(image)
    assert len(result.raw) == 1
    assert_same(result, rgb.explain([image]))
    if form != "grey_2d":
        assert_same(result, rgb.explain([image_files[0]]))


@pytest.mark.parametrize(("form", "error", "message"), [
    ("missing", MissingImageError, "{path}: no such file"),
    ("number", BadImageError, "unsupported image source: int"),
    ("vector", BadImageError, "an image array must be [H, W] or [H, W, 1|3|4], got (7,)"),
    ("text_bytes", BadImageError, "image: not an image file"),
])
def test_a_single_bad_image_raises_its_own_error(rgb: Explainer, image_files: list[Path],
                                                 form: str, error: type, message: str) -> None:
    image = single(form, image_files[0], rgb)
    with pytest.raises(error) as caught:
        rgb.explain(image)
    assert type(caught.value) is error
    assert str(caught.value) == message.format(path=image)


@pytest.mark.tf
def test_mnist_grey_keras_bundle(mnist_path: Path, folder: Path, image_files: list[Path]) -> None:
    """The Keras MNIST CNN (28x28x1): grey and colour files of other sizes, PNG and JPEG."""
    out = folder / "mnist.bundle.onnx"
    export(mnist_path, out)
    mnist = Explainer(out, device="cpu")
    assert mnist.info.channels == 1 and (mnist.info.height, mnist.info.width) == (28, 28)
    result = mnist.explain(image_files, targets=list(range(len(image_files))))
    check_shapes(result, mnist, len(image_files))
    np.testing.assert_array_equal(result.targets, np.arange(len(image_files)))
    assert_same(result, mnist.explain(np.stack([resized(p, mnist) for p in image_files]),
                                      targets=list(range(len(image_files)))))


# ------------------------------------------------------------------------------ targets


def test_targets_none_int_and_list(rgb: Explainer, image_files: list[Path]) -> None:
    top1 = rgb.explain(image_files)
    np.testing.assert_array_equal(top1.targets, top1.logits.argmax(axis=1))
    assert top1.targets.dtype == np.int64

    every = rgb.explain(image_files, targets=2)
    np.testing.assert_array_equal(every.targets, np.full(len(image_files), 2))
    np.testing.assert_allclose(every.logits, top1.logits, rtol=1e-6)

    chosen = [4, 0, 2, 1, 3]
    mixed = rgb.explain(image_files, targets=chosen)
    np.testing.assert_array_equal(mixed.targets, chosen)
    assert_same(rgb.explain(image_files, targets=np.array(chosen)), mixed)
    # each image's map depends on its own target only
    for n, t in enumerate(chosen):
        alone = rgb.explain([image_files[n]], targets=[t])
        np.testing.assert_allclose(alone.raw[0], mixed.raw[n], rtol=1e-5, atol=1e-6)
    # explicitly asking for the top-1 classes gives the default's maps
    assert_same(rgb.explain(image_files, targets=top1.targets.tolist()), top1)


def test_probabilities_are_the_softmax_of_the_logits(explainer: Explainer,
                                                     image_files: list[Path]) -> None:
    result = explainer.explain(image_files)
    p = result.probabilities
    assert p.dtype == np.float32 and p.shape == result.logits.shape
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    z = result.logits.astype(np.float64)
    want = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, want / want.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_top_structure(rgb: Explainer, grey: Explainer, image_files: list[Path]) -> None:
    result = rgb.explain(image_files)
    top = result.top()
    assert result.labels == LABELS and result.label(1) == "dog" and result.label(9) == "9"
    assert len(top) == len(image_files)
    for row, probabilities in zip(top, result.probabilities):
        assert len(row) == 5  # min(k=5, K=5)
        assert [set(entry) for entry in row] == [{"class", "label", "score"}] * 5
        classes = [entry["class"] for entry in row]
        assert sorted(classes) == list(range(5))
        assert all(type(entry["class"]) is int and type(entry["score"]) is float
                   for entry in row)
        assert [entry["label"] for entry in row] == [LABELS[c] for c in classes]
        scores = [entry["score"] for entry in row]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx([float(probabilities[c]) for c in classes])
    assert [row[0]["class"] for row in top] == result.targets.tolist()
    assert [len(row) for row in result.top(2)] == [2] * len(image_files)
    assert result.top(2) == [row[:2] for row in top]
    # without labels, a class's label is its number
    unlabelled = grey.explain(image_files[:2]).top(3)
    assert all(entry["label"] == str(entry["class"]) for row in unlabelled for entry in row)


def test_top_ranks_as_the_target_does_when_probabilities_tie(rgb: Explainer,
                                                             image_files: list[Path]) -> None:
    """Logits one float32 step apart round to equal probabilities; the top-1 target
    is their argmax, and ``top`` must put that class first (issue 12: --json gave
    target 1 but top[0] class 0)."""
    import dataclasses

    result = rgb.explain(image_files[:1])
    low = np.float32(0.001)
    logits = np.array([[low, np.nextafter(low, np.float32(1)), -5, -5, -5]], np.float32)
    tied = dataclasses.replace(result, logits=logits, targets=logits.argmax(axis=1))
    assert tied.probabilities[0, 0] == tied.probabilities[0, 1]
    assert [entry["class"] for entry in tied.top(2)[0]] == [1, 0]


# ------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam", "scorecam"])
def test_batch_size_does_not_change_results(rgb: Explainer, image_files: list[Path],
                                            method: str) -> None:
    targets = [1, 2, 3, 4, 0]
    default = rgb.explain(image_files, targets, method=method)
    for size in (1, 2):
        assert_same(rgb.explain(image_files, targets, method=method, batch_size=size), default,
                    rtol=1e-5)
    # a uint8 batch goes through the same batching
    batch = np.stack([resized(p, rgb) for p in image_files])
    assert_same(rgb.explain(batch, targets, method=method, batch_size=2), default, rtol=1e-5)


def source_model(
    explainer: Explainer, source: onnx.ModelProto, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The source model on ``images`` preprocessed as the bundle says, NCHW: the
    target layer's activations (``feat``) and the pre-softmax scores, float64."""
    info = explainer.info
    assert info.target_layer == "last_relu" and info.layout == "nchw"
    logits = "logits" if source.graph.output[0].name == "probs" else source.graph.output[0].name
    run = source_outputs(source, ["feat", logits])
    model_input = preprocess_numpy(images, info.preprocess).astype(np.float64).transpose(0, 3, 1, 2)
    return run(model_input)[0], model_input, lambda x: run(x)[1]


def method_reference(method: str, explainer: Explainer, bundle: Path, source: onnx.ModelProto,
                     images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The method's raw map by the paper's formula, from a plain run of the bundle
    (gradient methods) or of the source model (Eigen-CAM, Score-CAM)."""
    if method in GRADIENT_REFS:
        outputs = bundle_outputs(bundle, images, targets)
        return GRADIENT_REFS[method](outputs["activations"], outputs["gradients"])
    activations, model_input, source_logits = source_model(explainer, source, images)
    if method == "scorecam":
        return ref_scorecam(activations, model_input, "nchw", targets, source_logits)
    if method == "fem":
        return ref_fem(activations)
    if method == "kpca-cam":
        return relu(ref_kpca(activations))
    return ref_eigen_projection(activations)


@pytest.mark.parametrize("name", ["rgb", "grey"])
def test_every_method_matches_its_formula_on_grey_and_rgb(
    request: pytest.FixtureRequest, name: str, sources: dict[str, onnx.ModelProto],
    image_files: list[Path],
) -> None:
    explainer: Explainer = request.getfixturevalue(name)
    bundle: Path = request.getfixturevalue(f"{name}_bundle")
    images = np.stack([resized(p, explainer) for p in image_files[:3]])
    targets = np.array([1, 0, 3], np.int64)
    for method in ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                   "gradcam-elementwise", "eigencam", "fem", "kpca-cam", "scorecam"]:
        result = explainer.explain(image_files[:3], targets, method=method)
        check_shapes(result, explainer, 3)
        assert result.method == method
        want = method_reference(method, explainer, bundle, sources[name], images, targets)
        if method == "eigencam":
            assert_projection_close(result.raw, want)
        else:
            assert float(want.max()) > 0, f"{method}: degenerate reference"
            assert_maps_close(result.raw, want, rtol=2e-4)


# ------------------------------------------------------------------------------ fd bundles


def test_fd_gradcam_is_close_to_analytic(fd: Explainer, rgb: Explainer,
                                         image_files: list[Path]) -> None:
    assert not fd.info.has_gradients and rgb.info.has_gradients
    targets = [0, 1, 2, 3, 4]
    approx = fd.explain(image_files, targets)
    exact = rgb.explain(image_files, targets)
    np.testing.assert_allclose(approx.logits, exact.logits, rtol=1e-5, atol=1e-5)
    for a, e in zip(approx.raw, exact.raw):
        assert np.abs(a - e).max() <= 3e-2 * max(float(e.max()), 1e-6)
    np.testing.assert_allclose(approx.heatmaps, exact.heatmaps, atol=3e-2)


@pytest.mark.parametrize("method", GRADIENT_MAP_METHODS)
def test_fd_bundle_refuses_gradient_map_methods(fd: Explainer, image_files: list[Path],
                                                method: str) -> None:
    with pytest.raises(BadMethodError) as caught:
        fd.explain(image_files[:2], method=method)
    message = str(caught.value)
    assert method in message and "gradient" in message
    assert "fd" in message or "finite difference" in message
    assert "\n" not in message
    check_shapes(fd.explain(image_files[:2]), fd, 2)  # and it still works


@pytest.mark.parametrize("method", ["eigencam", "fem", "kpca-cam", "scorecam"])
def test_fd_bundle_runs_gradient_free_methods(fd: Explainer, fd_bundle: Path, rgb: Explainer,
                                              sources: dict[str, onnx.ModelProto],
                                              image_files: list[Path], method: str) -> None:
    """The fd bundle's maps follow the formula on the SOURCE model's activations and
    scores (nothing read from either bundle), and agree with the analytic bundle's."""
    targets = np.array([0, 1, 2, 3, 4], np.int64)
    result = fd.explain(image_files, targets, method=method)
    images = np.stack([resized(p, fd) for p in image_files])
    want = method_reference(method, fd, fd_bundle, sources["rgb"], images, targets)
    if method == "eigencam":
        assert_projection_close(result.raw, want)
    else:
        assert_maps_close(result.raw, want, rtol=2e-4)
    assert_same(result, rgb.explain(image_files, targets, method=method), rtol=1e-4)


# ------------------------------------------------------------------------------ bad input


def truncated(source: Path, out: Path) -> Path:
    data = source.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.fixture(scope="module")
def bad_files(folder: Path, image_files: list[Path]) -> dict[str, Path]:
    text = folder / "notes.png"
    text.write_text("this is not an image\n")
    return {
        "text": text,
        "truncated_png": truncated(image_files[4], folder / "cut.png"),
        "truncated_jpeg": truncated(image_files[2], folder / "cut.jpg"),
        "empty": _touch(folder / "empty.png"),
        "missing": folder / "missing.png",
        "folder": folder,
    }


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["text", "truncated_png", "truncated_jpeg", "empty", "missing",
                                  "folder"])
def test_bad_image_file_names_the_file_and_the_explainer_survives(
    rgb: Explainer, image_files: list[Path], bad_files: dict[str, Path], kind: str
) -> None:
    before = rgb.explain(image_files[:3])
    bad = bad_files[kind]
    with pytest.raises(BadImageError) as caught:
        rgb.explain([image_files[0], bad, image_files[1]])
    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)
    # in a later batch of a multi-batch run, too
    with pytest.raises(BadImageError, match="^" + re.escape(str(bad))):
        rgb.explain([*image_files[:3], bad], batch_size=2)
    assert_same(rgb.explain(image_files[:3]), before)


def test_image_over_the_pixel_limit(rgb_bundle: Path, folder: Path,
                                    image_files: list[Path]) -> None:
    small = Explainer(rgb_bundle, device="cpu", limits=Limits(max_pixels=64 * 64))
    big = folder / "big.png"
    picture(100, 100, 9).save(big)
    with pytest.raises(BadImageError) as caught:
        small.explain([big])
    message = str(caught.value)
    assert str(big) in message and "limit" in message and str(64 * 64) in message
    # a decompression bomb: a 150-byte PNG whose header claims 20000x20000 pixels
    bomb = folder / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))
    with pytest.raises(BadImageError) as caught:
        small.explain([image_files[0], bomb])
    assert str(bomb) in str(caught.value) and "pixels" in str(caught.value)
    result = small.explain(image_files[:2])  # 37x29 and 50x64: under the limit
    check_shapes(result, small, 2)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def test_image_over_the_byte_limit(rgb_bundle: Path, image_files: list[Path]) -> None:
    size = image_files[4].stat().st_size
    small = Explainer(rgb_bundle, device="cpu", limits=Limits(max_bytes=size - 1))
    with pytest.raises(BadImageError, match="limit") as caught:
        small.explain([image_files[4]])
    assert str(image_files[4]) in str(caught.value)


@pytest.mark.parametrize("targets", [5, -1, 99, [0, 1, 5], [0, -2, 1]])
def test_target_outside_the_classes(rgb: Explainer, image_files: list[Path], targets) -> None:
    with pytest.raises(BadTargetError) as caught:
        rgb.explain(image_files[:3], targets=targets)
    message = str(caught.value)
    bad = targets if isinstance(targets, int) else [t for t in targets if not 0 <= t < 5][0]
    assert str(bad) in message and "[0, 5)" in message
    check_shapes(rgb.explain(image_files[:3], targets=4), rgb, 3)


@pytest.mark.parametrize("targets", [[0, 1], [0, 1, 2, 3], 1.5, "no such class",
                                     [[0], [1], [[2]]], [[0], [1], []]])
def test_malformed_targets(rgb: Explainer, image_files: list[Path], targets) -> None:
    with pytest.raises(BadTargetError):
        rgb.explain(image_files[:3], targets=targets)


@pytest.mark.parametrize("method", ["gradcam+", "GradCAM", "", "grad-cam"])
def test_unknown_method(rgb: Explainer, image_files: list[Path], method: str) -> None:
    with pytest.raises(BadMethodError) as caught:
        rgb.explain(image_files[:2], method=method)
    message = str(caught.value)
    assert repr(method) in message and "gradcam++" in message and "scorecam" in message
    check_shapes(rgb.explain(image_files[:2], method="gradcam"), rgb, 2)


@pytest.mark.parametrize("kind", [
    "plain_onnx",
    "empty",
    "text", "png", "missing", "folder",
])
def test_not_a_bundle(folder: Path, cnn_source: Path, image_files: list[Path],
                      rgb: Explainer, kind: str) -> None:
    bad = folder / f"bundle_{kind}.onnx"
    if kind == "plain_onnx":
        bad = cnn_source
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("name,score\nnot,a model\n")
    elif kind == "png":
        bad = image_files[0]
    elif kind == "folder":
        bad = folder
    with pytest.raises(BundleError) as caught:
        Explainer(bad, device="cpu")
    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)
    check_shapes(rgb.explain(image_files[:1]), rgb, 1)  # nothing else broke


def test_not_a_bundle_class_only(folder: Path, cnn_source: Path) -> None:
    """Whatever the message, a plain ONNX model and an empty file are BundleErrors."""
    empty = folder / "also_empty.onnx"
    empty.write_bytes(b"")
    for bad in (cnn_source, empty):
        with pytest.raises(BundleError, match="onnxcam"):
            Explainer(bad, device="cpu")


# ------------------------------------------------------------------------------ devices


def test_cpu_device(rgb_bundle: Path, image_files: list[Path],
                    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """device="cpu" stays on the CPU even where CUDA would work, with no CUDA warning,
    and gives what a plain onnxruntime CPU session and Grad-CAM's formula give."""
    monkeypatch.setattr(onnxcam.runtime, "cuda_usable", lambda: True)
    with caplog.at_level(logging.WARNING):
        cpu = Explainer(rgb_bundle, device="cpu")
    assert cpu.device == "cpu"
    assert cpu.sessions.session_for(["cam"]).get_providers() == ["CPUExecutionProvider"]
    assert not [r for r in caplog.records if "CUDA" in r.getMessage()]
    result = cpu.explain(image_files)
    images = np.stack([resized(p, cpu) for p in image_files])
    plain = bundle_outputs(rgb_bundle, images, result.targets)
    np.testing.assert_allclose(result.logits, plain["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.targets, plain["logits"].argmax(axis=1))
    assert_maps_close(result.raw, ref_gradcam(plain["activations"], plain["gradients"]))


def test_cuda_falls_back_to_cpu(rgb_bundle: Path, rgb: Explainer, image_files: list[Path],
                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cuda = Explainer(rgb_bundle, device="cuda")
    assert cuda.device == "cpu"
    assert any("CUDA" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert_same(cuda.explain(image_files, method="gradcam++"),
                rgb.explain(image_files, method="gradcam++"))
    assert Explainer(rgb_bundle, device="auto").device == "cpu"


def test_bundle_from_bytes(rgb_bundle: Path, rgb: Explainer, image_files: list[Path]) -> None:
    from_bytes = Explainer(rgb_bundle.read_bytes(), device="cpu")
    assert from_bytes.info == rgb.info
    assert_same(from_bytes.explain(image_files), rgb.explain(image_files))


@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam"])
def test_io_binding_path_gives_the_same_results(rgb_bundle: Path, method: str) -> None:
    # The CUDA path runs through IO binding; the CPU provider supports it too, so the
    # code path is checked here even without a GPU.
    batch = np.random.default_rng(11).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    plain = Explainer(rgb_bundle, device="cpu")
    bound = Explainer(rgb_bundle, device="cpu")
    bound.sessions.use_io_binding = True
    assert_same(bound.explain(batch, method=method), plain.explain(batch, method=method))

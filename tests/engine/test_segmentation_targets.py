"""Segmentation through the engine: ``Explainer.explain`` with ``Region`` targets and
several classes per image in one call, method by method, against pytorch-grad-cam's
``SemanticSegmentationTarget`` (torchvision FCN, DeepLabV3, LR-ASPP) and TF
GradientTape (a Keras U-Net); a user's mask at the image's own size; the CLI.

Maps are compared at the layer's resolution, min-max normalised, as the references
make them; never against the code under test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cam_references
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image
from segmenters import (
    SIZE,
    export_torch,
    image,
    map_error,
    pytorch_grad_cam_maps,
    tape_outputs,
    tiny_segmenter,
    torch_input,
    torchvision_segmenter,
    unet_pair,
)

import onnxcam
from onnxcam import Explainer, Region
from onnxcam.cli import main
from onnxcam.runtime import cpu_session

log = logging.getLogger(__name__)

TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps
METHODS = ("gradcam", "hirescam", "xgradcam", "layercam", "gradcam++")
# name: (exporter, export layer (None: the default), the pytorch-grad-cam layer). One
# exporter each (the exporter's tests cover all three for Grad-CAM); the dynamo one's
# bundle runs at any batch since its Resize sizes follow the batch. The layers are the
# heads' ReLU'd features (FCN's and DeepLabV3's defaults; LR-ASPP's default, the gated
# Mul, is no module to hook): at DeepLabV3's HardSwish backbone.16 channel sums come
# near zero, where XGradCAM and Grad-CAM++ divide by them, and float32 rounding alone
# (torch's own gradients) moves their maps by 2e-3 and 1.5e-2.
CASES = {
    "fcn": ("module", None, lambda m: m.classifier[2]),
    "deeplabv3": ("dynamo", None, lambda m: m.classifier[3]),
    "lraspp": ("legacy", "classifier.cbr", lambda m: m.classifier.cbr),
}


def two_regions(logits: np.ndarray) -> list[list[int]]:
    """Each image's two classes that win the most pixels, best first."""
    winners = logits.argmax(axis=1)
    counts = [np.bincount(each.ravel(), minlength=logits.shape[1]) for each in winners]
    return [[int(c) for c in np.argsort(-count, kind="stable")[:2]] for count in counts]


def region_rows(logits: np.ndarray, classes: list[list[int]]
                ) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
    """Each (image, class) row's image and (class, the pixels it wins)."""
    images = [n for n, each in enumerate(classes) for _ in each]
    regions = [(c, logits[n].argmax(axis=0) == c) for n, each in enumerate(classes) for c in each]
    assert all(mask.any() for _, mask in regions)  # every region has pixels
    return images, regions


def mixed_targets(classes: list[list[int]]) -> list[list[Any]]:
    """The classes as the engine takes them: Region(c), and a bare class number (which
    means Region(c) on a segmentation bundle), in turn."""
    return [[Region(c) if (n + k) % 2 == 0 else c for k, c in enumerate(each)]
            for n, each in enumerate(classes)]


# ------------------------------------------------------------------ torchvision


@pytest.fixture(scope="module", params=list(CASES))
def torch_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Any, Explainer]:
    pytest.importorskip("torchvision.models.segmentation")
    name = request.param
    model = torchvision_segmenter(name, live=True)
    how, layer, _ = CASES[name]
    bundle = export_torch(model, how, layer, tmp_path_factory.mktemp(name))
    return name, model, Explainer(bundle, device="cpu")


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("method", METHODS)
def test_torchvision_regions_match_pytorch_grad_cam(torch_case: tuple[str, Any, Explainer],
                                                    method: str) -> None:
    """Two images, two classes each, in one call (the trunk once, the head per row)."""
    import torch

    name, model, explainer = torch_case
    pixels = image(seed=11, count=2)
    x = torch_input(pixels, torch)
    with torch.no_grad():
        logits = model(x)["out"].numpy()
    classes = two_regions(logits)
    got = explainer.explain(pixels, mixed_targets(classes), method=method)
    images, regions = region_rows(logits, classes)
    assert got.image_index.tolist() == images
    assert got.targets.tolist() == [c for each in classes for c in each]
    want = pytorch_grad_cam_maps(model, CASES[name][2](model), x[images], regions, method)
    errors = [map_error(g, w) for g, w in zip(got.raw, want)]
    log.info("%s %s: max map error %.2e", name, method, max(errors))
    assert any(w.max() > 0 for w in want)  # a region may raise no channel: an empty map
    assert max(errors) <= TOLERANCE


def mask_at(size: int) -> np.ndarray:
    """A user's region at ``size``: a rectangle and a disc, off the centre."""
    rows, cols = np.mgrid[:size, :size] / size
    return ((rows > 0.1) & (rows < 0.45) & (cols > 0.3)) | ((rows - 0.7) ** 2 +
                                                             (cols - 0.35) ** 2 < 0.04)


@pytest.mark.slow
@pytest.mark.torch
def test_a_mask_at_the_images_own_size(torch_case: tuple[str, Any, Explainer]) -> None:
    """A 96x96 image and its 96x96 mask: the engine brings the image to the model's
    64x64 and the mask to the output's; the reference does both with PIL."""
    import torch

    name, model, explainer = torch_case
    big, region = image(seed=12, size=96)[0], mask_at(96)
    got = explainer.explain([big], [[Region(2, region), Region(3, region)]])
    small = np.asarray(Image.fromarray(big).resize((SIZE, SIZE), Image.BILINEAR))[None]
    mask = np.asarray(Image.fromarray(region).resize((SIZE, SIZE), Image.NEAREST))
    want = pytorch_grad_cam_maps(model, CASES[name][2](model),
                                 torch_input(small, torch).repeat(2, 1, 1, 1),
                                 [(2, mask), (3, mask)])
    errors = [map_error(g, w) for g, w in zip(got.raw, want)]
    log.info("%s user mask: max map error %.2e", name, max(errors))
    assert max(errors) <= TOLERANCE


# ------------------------------------------------------------------ Keras U-Net


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Explainer]:
    """The U-Net's bundle at its bottleneck (the gradient crosses the Conv2DTranspose,
    the bilinear UpSampling2D and both skip Concatenates) and its softmax-free twin."""
    pytest.importorskip("tensorflow")
    with_softmax, linear = unet_pair()
    path = tmp_path_factory.mktemp("unet") / "unet.cam.onnx"
    onnxcam.export(with_softmax, path, layer="bottleneck")
    return linear, Explainer(path, device="cpu")


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("method", METHODS)
def test_keras_unet_regions_match_gradient_tape(unet_case: tuple[Any, Explainer],
                                                method: str) -> None:
    linear, explainer = unet_case
    pixels = image(seed=13, count=2, size=SIZE // 2)
    logits = linear.predict(pixels.astype(np.float32) / 255.0, verbose=0).transpose(0, 3, 1, 2)
    classes = two_regions(logits)
    got = explainer.explain(pixels, mixed_targets(classes), method=method)
    images, regions = region_rows(logits, classes)
    assert got.image_index.tolist() == images
    activations, gradients = tape_outputs(linear, "bottleneck", pixels[images], regions)
    reference = {"gradcam": cam_references.ref_gradcam, "hirescam": cam_references.ref_hirescam,
                 "xgradcam": cam_references.ref_xgradcam,
                 "layercam": cam_references.ref_layercam,
                 "gradcam++": cam_references.ref_gradcam_pp}[method]
    want = reference(activations, gradients)
    errors = [map_error(g, w) for g, w in zip(got.raw, want)]
    log.info("unet %s: max map error %.2e", method, max(errors))
    assert any(w.max() > 0 for w in want)  # a region may raise no channel: an empty map
    assert max(errors) <= TOLERANCE


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "seg.cam.onnx"
    onnxcam.export(tiny_segmenter(), path, layer="relu")
    return path


def tiny_reference(pixels: np.ndarray, cls: int, mask: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The tiny segmenter's scores [3, 8, 8] (onnxruntime on the source) and its
    Grad-CAM for ``cls`` over ``mask`` by hand: the gradient at the relu is the class's
    1x1 weights at each pixel of the mask, so the channel weights are those weights
    times the mask's share of the pixels."""
    model = tiny_segmenter()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("relu", 1, None))
    probe.ir_version = 8  # what onnxruntime reads; helper writes the newest
    x = (pixels.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    scores, relu = cpu_session(probe.SerializeToString()).run(["scores", "relu"], {"input": x})
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1])[:, :, 0, 0].astype(np.float64)
    weights = w2[cls] * mask.mean()
    return scores[0], np.maximum(np.einsum("chw,c->hw", relu[0].astype(np.float64), weights), 0)


def test_cli_explains_several_regions_of_a_segmenter(tiny_bundle: Path, tmp_path: Path) -> None:
    pixels = image(seed=3, size=8)[0]
    Image.fromarray(pixels).save(tmp_path / "img.png")
    out = tmp_path / "maps"
    run = CliRunner().invoke(main, ["explain", str(tiny_bundle), str(tmp_path / "img.png"),
                                    "--out", str(out), "--target", "1", "--target", "2",
                                    "--raw", "--json"])
    assert run.exit_code == 0, run.output
    records = [json.loads(line) for line in run.stdout.splitlines()]
    scores, _ = tiny_reference(pixels, 0, np.ones((8, 8)))
    shares = np.bincount(scores.argmax(axis=0).ravel(), minlength=3) / 64
    order = np.argsort(-shares, kind="stable")
    assert [r["target"] for r in records] == [1, 2]
    for record in records:
        cls = record["target"]
        assert record["logits"] is None  # a score per pixel is not a line's worth
        assert [t["class"] for t in record["top"]] == order.tolist()
        np.testing.assert_allclose([t["score"] for t in record["top"]], shares[order])
        stem = f"img.{record['target_name']}"
        assert sorted(record["files"]) == sorted(
            str(out / f"{stem}{suffix}") for suffix in (".npy", ".png", ".raw.npy"))
        _, want = tiny_reference(pixels, cls, scores.argmax(axis=0) == cls)
        np.testing.assert_allclose(np.load(out / f"{stem}.raw.npy"), want, rtol=1e-4,
                                   atol=1e-5 * max(want.max(), 1e-6))


def test_cli_explains_a_class_over_a_mask_file(tiny_bundle: Path, tmp_path: Path) -> None:
    """The mask file at the image's own size (16x16, the bundle's input is 8x8)."""
    pixels = image(seed=4, size=16)[0]
    Image.fromarray(pixels).save(tmp_path / "img.png")
    region = mask_at(16)
    Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / "region.png")
    out = tmp_path / "maps"
    run = CliRunner().invoke(main, ["explain", str(tiny_bundle), str(tmp_path / "img.png"),
                                    "--out", str(out), "--target", "1", "--mask",
                                    str(tmp_path / "region.png"), "--raw", "--json"])
    assert run.exit_code == 0, run.output
    (record,) = [json.loads(line) for line in run.stdout.splitlines()]
    assert record["target"] == 1 and record["logits"] is None
    small = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(region).resize((8, 8), Image.NEAREST))
    _, want = tiny_reference(small, 1, mask)
    (raw,) = [f for f in record["files"] if f.endswith(".raw.npy")]
    np.testing.assert_allclose(np.load(raw), want, rtol=1e-4, atol=1e-5 * max(want.max(), 1e-6))

"""Vision transformers (issue 10, item 4): token layers explained on their grid.

A tiny torchvision ViT ([N, T, C] tokens, one class token) and a tiny Swin
(channels-last [N, h, w, C] maps), exported with a dynamic batch, get the last
block's first LayerNorm by default; every CAM method's map there is held against
pytorch-grad-cam with its ``reshape_transform``, and the audit runs on the ViT bundle.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

import zoo  # noqa: E402  (tests/zoo.py)
from PIL import Image  # noqa: E402

from onnxcam import Explainer, export, read_bundle_info  # noqa: E402
from onnxcam.exporter import describe, list_layers  # noqa: E402
from onnxcam.layout import TokenGrid  # noqa: E402

pytestmark = pytest.mark.torch

CLASSES = 5
SIZE = 32
TARGETS = (1, 3)
LABELS = [f"class{i}" for i in range(CLASSES)]


def tiny_vit() -> Any:
    return torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=CLASSES)


def tiny_swin() -> Any:
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        num_classes=CLASSES)


MODELS = {
    "vit": zoo.ZooModel("tiny_vit", tiny_vit, SIZE, "encoder.layers.encoder_layer_1.ln_1", "vit"),
    "swin": zoo.ZooModel("tiny_swin", tiny_swin, SIZE, "features.3.1.norm1", "swin"),
}
# onnxcam's method name -> pytorch-grad-cam's class.
METHODS = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
    "layercam": "LayerCAM", "hirescam": "HiResCAM", "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}


class Exported:
    """A tiny transformer, its ONNX file, its bundle at the default layer, and the
    ONNX tensor of pytorch-grad-cam's usual layer."""

    def __init__(self, entry: zoo.ZooModel, folder: Path) -> None:
        self.entry = entry
        self.model = entry.model()
        self.source = zoo.export_torch(entry, self.model, "dynamic", folder / "model.onnx")
        example = zoo.torch_input(zoo.images(SIZE, 1, seed=99))
        self.usual = zoo.onnx_layer_name(self.source, self.model, entry.layer, example)
        self.bundle = folder / "model.cam.onnx"
        self.result = export(self.source, self.bundle, preprocess=zoo.PREPROCESS,
                             labels=LABELS)
        assert self.result.report is not None and self.result.report.ok


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Exported:
    return Exported(MODELS[request.param], tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(MODELS["vit"], tmp_path_factory.mktemp("vit_audit"))


def reference_map(entry: zoo.ZooModel, model: Any, method: str, batch: np.ndarray,
                  targets: tuple[int, ...] = TARGETS) -> np.ndarray:
    """pytorch-grad-cam's map for ``method`` at the usual layer, after ReLU, unresized,
    image i for class ``targets[i]``."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    base = getattr(pytorch_grad_cam, METHODS[method])

    class Raw(base):  # type: ignore[misc, valid-type]
        raw: np.ndarray

        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(*args, **kwargs)
            self.raw = np.maximum(cam, 0)
            return cam

    layer = model.get_submodule(entry.layer)
    with Raw(model=model, target_layers=[layer],
             reshape_transform=entry.reshape_transform()) as cam:
        cam(input_tensor=zoo.torch_input(batch),
            targets=[ClassifierOutputTarget(t) for t in targets])
        return cam.raw


def test_default_is_the_last_blocks_first_layernorm(exported: Exported) -> None:
    tensors = {layer.name: layer.tensor for layer in list_layers(exported.source)}
    assert tensors[exported.result.info.target_layer] == exported.usual
    assert "LayerNormalization" in exported.usual


def test_bundle_records_the_grid(exported: Exported) -> None:
    info = read_bundle_info(exported.bundle)
    if exported.entry.reshape == "vit":  # 16 patches of 8x8 after one class token
        assert info.activation_layout == "ntc"
        assert info.activation_grid == TokenGrid(1, 4, 4)
        assert info.layers[0].activation_layout == TokenGrid(1, 4, 4)
    else:  # Swin's maps are NHWC already: no grid key, as for a CNN
        assert info.activation_layout == "nhwc"
        assert info.activation_grid is None
        assert "onnxcam.activation_grid" not in info.to_metadata()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_maps_match_pytorch_grad_cam(exported: Exported, method: str) -> None:
    batch = zoo.images(SIZE)
    ours = Explainer(exported.bundle, device="cpu").explain(batch, list(TARGETS),
                                                            method=method).raw
    want = reference_map(exported.entry, exported.model, method, batch)
    assert ours.shape == want.shape == (len(batch), 4, 4)
    assert np.ptp(want) > 0  # a flat map would match anything
    assert zoo.map_error(ours, want) <= zoo.MAP_TOLERANCE


@pytest.mark.parametrize("method", ["gradcam"])
def test_several_targets_per_image_share_the_trunk(exported: Exported, method: str) -> None:
    """Every class for every image in one call: the bundle is cut after the layer (the
    transformer's last block runs once per target, the rest once), and each row is
    pytorch-grad-cam's map for that image and class."""
    assert read_bundle_info(exported.bundle).head_inputs
    batch = zoo.images(SIZE)
    res = Explainer(exported.bundle, device="cpu").explain(
        batch, [list(range(CLASSES))] * len(batch), method=method)
    assert res.image_index.tolist() == [i for i in range(len(batch)) for _ in range(CLASSES)]
    for cls in range(CLASSES):
        want = reference_map(exported.entry, exported.model, method, batch,
                             (cls,) * len(batch))
        assert zoo.map_error(res.raw[cls::CLASSES], want) <= zoo.MAP_TOLERANCE


def test_in_graph_weights_are_the_grid_mean_of_the_gradients(exported: Exported) -> None:
    """``weights`` and ``cam`` from the graph, against numpy on its own outputs: the
    leading tokens take no part."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.bundle), providers=["CPUExecutionProvider"])
    acts, grads, weights, cam = session.run(
        ["activations", "gradients", "weights", "cam"],
        {"image": zoo.images(SIZE), "target": np.array(TARGETS, np.int64)})
    layout = read_bundle_info(exported.bundle).layers[0].activation_layout
    grid_acts, grid_grads = layout.to_nchw(acts), layout.to_nchw(grads)
    np.testing.assert_allclose(weights, grid_grads.mean(axis=(2, 3)), rtol=1e-5, atol=1e-7)
    want = np.maximum(np.einsum("nc,nchw->nhw", weights, grid_acts), 0)
    np.testing.assert_allclose(cam, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))


def test_layers_listing_shows_grids(exported: Exported) -> None:
    lines = describe(list_layers(exported.source))
    (default,) = [line for line in lines if line.startswith("*")]
    assert default.split()[1] == exported.result.info.target_layer
    tokens = [line for line in lines if "tokens:" in line]
    if exported.entry.reshape == "vit":
        # Then the module the layer is the output of (torch wrote the file).
        assert default.endswith(" 17x32  (tokens: 1 + 4x4 grid)  " + exported.entry.layer)
        # name, op, shape as for any layer; the patches before the class token have no lead
        shapes = {line[2:].split()[2]: line.split("(tokens: ")[1].split("  ")[0]
                  for line in tokens}
        assert shapes == {"16x32": "0 + 4x4 grid)", "17x32": "1 + 4x4 grid)",
                          "17x64": "1 + 4x4 grid)"}
    else:
        assert not tokens and default.split()[3:] == ["4x4x32", exported.entry.layer]


def test_audit_runs_on_the_vit_bundle(vit: Exported, tmp_path: Path) -> None:
    from onnxcam.audit import AuditOptions, LocalBackend, run_audit

    batch = zoo.images(SIZE, 4, seed=5)
    rows = []
    for i, pixels in enumerate(batch):
        path = tmp_path / f"{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append([str(path), LABELS[i % CLASSES], "2 2 20 24"])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label", "bbox"])
        writer.writerows(rows)
    explainer = Explainer(vit.bundle, device="cpu")
    out = tmp_path / "out"
    summary = run_audit(manifest, out, LocalBackend(explainer), AuditOptions())
    assert summary.data["n"] == 4 and summary.data["errors"] == 0
    with open(out / "results.csv", newline="") as stream:
        results = list(csv.DictReader(stream))
    expected = explainer.explain(batch, [i % CLASSES for i in range(len(batch))])  # the labels
    for n, row in enumerate(results):
        raw = np.load(out / row["heatmap"]).astype(np.float32)
        assert raw.shape == (4, 4)
        np.testing.assert_allclose(raw, expected.raw[n], rtol=1e-3,
                                   atol=1e-3 * float(expected.raw[n].max()))
        assert row["pred"] == LABELS[int(expected.logits[n].argmax())]
        assert 0.0 <= float(row["energy_in_box"]) <= 1.0
    assert json.loads((out / "summary.json").read_text())["n"] == 4


def test_several_layers_mix_token_and_nchw_maps(vit: Exported, tmp_path: Path) -> None:
    """A token layer, another one earlier, and the patch convolution (NCHW) in one
    bundle: each layer's map against pytorch-grad-cam at that module."""
    modules = {"encoder.layers.encoder_layer_1.ln_1": "vit",
               "encoder.layers.encoder_layer_0.ln_1": "vit", "conv_proj": ""}
    example = zoo.torch_input(zoo.images(SIZE, 1, seed=99))
    tensors = {module: zoo.onnx_layer_name(vit.source, vit.model, module, example)
               for module in modules}
    bundle = tmp_path / "layers.cam.onnx"
    assert export(vit.source, bundle, layer=list(tensors.values()),
                  preprocess=zoo.PREPROCESS).report is not None
    entries = read_bundle_info(bundle).layers
    assert [e.layout for e in entries] == ["nchw", "ntc", "ntc"]  # early to late
    names = {layer.tensor: layer.name for layer in list_layers(vit.source)}
    batch = zoo.images(SIZE)
    got = Explainer(bundle, device="cpu").explain(batch, list(TARGETS), method="gradcam++")
    for module, reshape in modules.items():
        entry = replace(vit.entry, layer=module, reshape=reshape)
        want = reference_map(entry, vit.model, "gradcam++", batch)
        assert zoo.map_error(got.layer_maps[names[tensors[module]]], want) <= zoo.MAP_TOLERANCE


def tiny_swin_v2() -> Any:
    from torchvision.models import swin_transformer

    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        num_classes=CLASSES, block=swin_transformer.SwinTransformerBlockV2,
        downsample_layer=swin_transformer.PatchMergingV2)


def test_swin_v2_post_norm_is_channels_last(tmp_path: Path) -> None:
    """Swin V2 normalises after attention: its norm1 reads the output projection, which
    the legacy exporter writes as Add(bias, MatMul). The layout is traced through the
    MatMul, not the bias (read as NCHW, a 4 x 4 x C map was 4 x C)."""
    entry = zoo.ZooModel("tiny_swin_v2", tiny_swin_v2, SIZE, "features.3.1.norm1", "swin")
    model = entry.model()
    source = zoo.export_torch(entry, model, "legacy", tmp_path / "model.onnx")
    usual = zoo.onnx_layer_name(source, model, entry.layer,
                                zoo.torch_input(zoo.images(SIZE, 1, seed=99)))
    result = export(source, tmp_path / "model.cam.onnx", layer=usual,
                    preprocess=zoo.PREPROCESS)
    assert result.info.activation_layout == "nhwc"
    batch = zoo.images(SIZE)
    ours = Explainer(result.path, device="cpu").explain(batch, list(TARGETS)).raw
    want = zoo.reference_maps(entry, model, batch, TARGETS)
    assert ours.shape == want.shape == (len(batch), 4, 4)
    assert np.ptp(want) > 0
    assert zoo.map_error(ours, want) <= zoo.MAP_TOLERANCE

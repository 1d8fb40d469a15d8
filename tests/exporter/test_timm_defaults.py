"""The default target layer on less common transformers from timm, as users export them.

LeViT pools all its tokens on a 4x4 grid that its attention subsamples from the
stem's 14x14 map: the default is its last block's output (before, an attention
tensor [1, 16, 8, 32] read as a 16-channel 8x32 map, and the tokens themselves were
refused as not 4-D). CaiT's head reads the class token, which only its
class-attention blocks update: the default is the last self-attention block's
``norm1`` (before, the final norm, whose every map is empty). PVTv2's default is its
last block's ``norm1`` (before, ``norm2``: the query's bias Add was taken for the
residual sum). Each default is held to the tensor holding that module's output,
found by value, for both of torch's exporters, and its map to pytorch-grad-cam's
GradCAM on that module with the token-grid reshape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import zoo
from tests.cam_references import assert_maps_close

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.timeout(900)]

# No weights anywhere: timm must never reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"


def _timm(name: str, **kwargs: Any) -> Any:
    def build() -> Any:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=zoo.CLASSES, **kwargs)

    return build


# LeViT needs a multiple of 16 and 224 for a last grid over 2x2 (14 -> 7 -> 4); CaiT
# and PVTv2 export at 64 (CaiT: 4x4 patches; PVTv2's last stage: 2x2).
TIMM: dict[str, zoo.ZooModel] = {m.name: m for m in (
    zoo.ZooModel("levit_128s", _timm("levit_128s", img_size=224), 224, "stages.2.blocks.3",
                 "tokens"),
    zoo.ZooModel("cait_xxs24_224", _timm("cait_xxs24_224", img_size=64), 64, "blocks.23.norm1",
                 "tokens"),
    zoo.ZooModel("pvt_v2_b0", _timm("pvt_v2_b0"), 64, "stages.3.blocks.1.norm1", "tokens"),
)}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    pytest.importorskip("timm")
    pytest.importorskip("pytorch_grad_cam")
    return {}  # built on first use, shared by both exporters


@pytest.mark.parametrize("exporter", zoo.PLAIN_EXPORTERS)
@pytest.mark.parametrize("name", sorted(TIMM))
def test_default_layer_is_the_usual_module_and_its_map_matches(
        name: str, exporter: str, models: dict[str, Any], tmp_path: Path) -> None:
    import onnxcam
    from onnxcam.exporter.frontends.onnx import prepare
    from onnxcam.exporter.layers import choose_layers

    entry = TIMM[name]
    if name not in models:
        models[name] = entry.model()
    model = models[name]
    source = zoo.export_torch(entry, model, exporter, tmp_path / f"{name}.onnx")
    example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    expected = zoo.onnx_layer_name(source, model, entry.layer, example)

    chosen = choose_layers(prepare(source, None, None, 17).layers, None)[0]
    assert chosen.tensor == expected, (chosen, expected)
    assert not chosen.attention

    bundle = tmp_path / f"{name}.cam.onnx"
    onnxcam.export(source, bundle, preprocess=zoo.PREPROCESS)
    batch = zoo.images(entry.size)
    reference = zoo.reference(entry, model, batch)
    explanation = onnxcam.Explainer(bundle, device="cpu").explain(
        batch, list(reference.targets), method="gradcam")
    assert_maps_close(explanation.raw, reference.maps, rtol=1e-4)
    assert not np.any(explanation.flat)
    spread = reference.maps.max(axis=(1, 2)) - reference.maps.min(axis=(1, 2))
    assert np.all(spread > 1e-3 * np.abs(reference.maps).max(axis=(1, 2)))

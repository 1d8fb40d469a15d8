"""The VJP rules composed over whole transformer graphs as torch's exporter writes them,
held against torch's own autograd.

Tiny ViT, Swin (v1 and v2), ConvNeXt and MaxViT, exported with a dynamic batch, so
the rules meet what the zoo brings (LayerNorm over tokens, Erf-GELU, the class
token's Gather, strided and computed slices, window padding, Einsum attention,
cosine attention's L2 norms) in the combinations it brings them. The input gradient
of sum(gy * logits) comes from the rules run over the whole graph.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_vjp import Case, analytic

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

# The legacy exporter warns about the shape checks it freezes; the probe runs batch 2 too.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

SIZE = 16
CLASSES = 5


def vit() -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=SIZE, patch_size=8, num_layers=1, num_heads=2,
                             hidden_dim=8, mlp_dim=16, num_classes=CLASSES)


def swin(v2: bool = False) -> Any:
    from torchvision.models import swin_transformer as st

    extra = {"block": st.SwinTransformerBlockV2, "downsample_layer": st.PatchMergingV2} \
        if v2 else {}
    return st.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                              window_size=[2, 2], num_classes=CLASSES, **extra)


def convnext() -> Any:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=CLASSES)


def maxvit() -> Any:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8],
                  block_layers=[1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES)


MODELS: dict[str, Callable[[], Any]] = {
    "vit": vit, "swin": swin, "swin_v2": lambda: swin(v2=True), "convnext": convnext,
    "maxvit": maxvit,
}


def perturbed(build: Callable[[], Any]) -> Any:
    """The model in eval mode, every parameter nudged so that no two are equal (as trained)."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape) * 1e-2)
    return model


def exported_case(model: Any, x: np.ndarray) -> Case:
    """torch's legacy export with a dynamic batch, as a harness case (input x, output y)."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.tensor(x),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    graph = onnx.load_from_string(buffer.getvalue()).graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return Case(list(graph.node), {"x": x}, consts)


@pytest.mark.parametrize("name", list(MODELS))
def test_rules_match_torch_autograd_over_whole_models(name: str) -> None:
    model = perturbed(MODELS[name])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    gy = rng.standard_normal((2, CLASSES)).astype(np.float32)
    got = analytic(exported_case(model, x), {"y": gy})["x"]
    inputs = torch.tensor(x, requires_grad=True)
    (model(inputs) * torch.tensor(gy)).sum().backward()
    want = inputs.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

"""Verification on what torch's legacy exporter writes: it runs to a verdict, the
verdict holds against torch's own autograd, and real defects are still refused.

The heads here read tensors from outside themselves the way exported zoo models
do: a parameter shared through an Identity node (two equal parameters), a shape
computed from the model's input (``x.reshape(x.shape[0], -1)``), scalar Constant
nodes (an Erf-GELU), token layers (Swin, MaxViT). Each used to crash verification.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxcam.bundle import INPUT_IMAGE, INPUT_TARGET, OUTPUT_GRADIENTS, OUTPUT_INPUT_GRADIENTS
from onnxcam.exporter import export
from onnxcam.exporter.verify.kernels import REFERENCE_OPS
from onnxcam.exporter.vjp import Rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.runtime import cpu_session

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
sys.path.insert(0, str(Path(__file__).parent))
from test_verify import Grads, Mutant, assert_refused, doubled, first_branch_only, replace_rule  # noqa: E402
from test_vjp_torch import SIZE, convnext, maxvit, perturbed, swin, vit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


class SharedBias(torch.nn.Module):
    """Two convolutions with equal biases (the legacy exporter stores one and reads
    the other through Identity) and a Reshape to a shape taken from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(16, 5)
        with torch.no_grad():
            self.conv2.bias.copy_(self.conv1.bias)

    def forward(self, x: Any) -> Any:
        batch = x.shape[0]
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 2).reshape(batch, -1))


def legacy_export(model: Any, path: Path, size: int = SIZE, opset: int = 17) -> Path:
    """torch's legacy exporter with a dynamic batch (static batches are another issue)."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.rand(1, 3, size, size),), buffer, dynamo=False,
                      opset_version=opset, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    path.write_bytes(buffer.getvalue())
    return path


def images(count: int = 2, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def run_bundle(path: Path, batch: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    session = cpu_session(path.read_bytes())
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_IMAGE: batch, INPUT_TARGET: targets})))


def torch_gradients(model: Any, batch: np.ndarray, targets: np.ndarray, module: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
    """d logit[target] / d (module's output) and d logit[target] / d input, by autograd
    (``preprocess="unit"``: the model reads x / 255, NCHW)."""
    x = torch.tensor(batch.transpose(0, 3, 1, 2).astype(np.float32) / 255, requires_grad=True)
    seen: list[Any] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        output.retain_grad()
        seen.append(output)

    handle = module.register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits[torch.arange(len(targets)), torch.tensor(targets)].sum().backward()
    return seen[-1].grad.numpy(), x.grad.numpy()


def test_a_shared_parameter_and_a_shape_from_the_input_are_verified(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SharedBias().eval()
    src = legacy_export(model, tmp_path / "shared.onnx")
    graph = onnx.load(str(src)).graph
    assert any(n.op_type == "Identity" for n in graph.node)  # the case under test
    assert any(n.op_type == "Shape" and n.input[0] == "x" for n in graph.node)
    layer = next(n.output[0] for n in graph.node if n.op_type == "Relu")
    result = export(src, tmp_path / "bundle.onnx", layer=layer)
    assert result.report is not None and result.report.ok
    batch, targets = images(), np.array([1, 3], np.int64)
    out = run_bundle(tmp_path / "bundle.onnx", batch, targets)
    want, _ = torch_gradients(model, batch, targets, model.conv1)  # relu's grad, where > 0
    assert result.info.activation_layout == "nchw"
    got = out[OUTPUT_GRADIENTS]
    live = want != 0
    np.testing.assert_allclose(got[live], want[live], rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_input_gradients_of_a_head_reading_scalar_constants(tmp_path: Path) -> None:
    """ConvNeXt's Erf-GELU reads 0-d Constant nodes from outside the body's head."""
    model = perturbed(convnext)
    src = legacy_export(model, tmp_path / "convnext.onnx")
    result = export(src, tmp_path / "bundle.onnx", input_gradients=True)
    assert result.report is not None
    assert result.report.errors[OUTPUT_INPUT_GRADIENTS] <= 1e-3
    batch, targets = images(), np.array([0, 4], np.int64)
    out = run_bundle(tmp_path / "bundle.onnx", batch, targets)
    _, want = torch_gradients(model, batch, targets, model.features)
    got = out[OUTPUT_INPUT_GRADIENTS].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["swin", "maxvit"])
def test_token_layers_are_verified(tmp_path: Path, name: str) -> None:
    """A layer inside the last block, whose head reads the block's residual input."""
    model = perturbed({"swin": swin, "maxvit": maxvit}[name])
    src = legacy_export(model, tmp_path / f"{name}.onnx")
    graph = onnx.load(str(src)).graph
    norms = [n.output[0] for n in graph.node
             if n.op_type in ("LayerNormalization", "Add") and "features" in n.name
             or n.op_type == "Add" and "blocks" in n.name]
    result = export(src, tmp_path / "bundle.onnx", layer=norms[-2])
    assert result.report is not None and result.report.ok


def reversed_channels(real: Rule, ctx: VjpContext, node: onnx.NodeProto, grads: Grads
                      ) -> Grads:
    """The gradient with its channels (axis 1) in reverse order: a transposing defect."""
    def flip(grad: str) -> str:
        bounds = [ctx.b.const(np.array([v], np.int64), f"flip_{name}")
                  for name, v in (("start", -1), ("end", -2**62), ("axis", 1), ("step", -1))]
        return ctx.b.op("Slice", [grad, *bounds])

    return [None if g is None else flip(g) for g in real(ctx, node, grads)]


@pytest.fixture(scope="module")
def resnet18_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's resnet18 at 64x64, weights perturbed as trained ones would be."""
    import torchvision
    import zoo

    model = zoo.perturb(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    return legacy_export(model, tmp_path_factory.mktemp("resnet18") / "resnet18.onnx", 64)


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-tiny (one block, 2x2 patches of 8) at 16x16: LayerNorm, attention, GELU."""
    return legacy_export(perturbed(vit), tmp_path_factory.mktemp("vit") / "vit.onnx")


@pytest.fixture(scope="module")
def gelu_vit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same ViT-tiny at opset 20, the legacy exporter's default, which writes each
    GELU as one Gelu node (as in the zoo's ViT-B and Swin exports), not as Erf."""
    path = legacy_export(perturbed(vit), tmp_path_factory.mktemp("vit20") / "vit.onnx",
                         opset=20)
    assert any(n.op_type == "Gelu" for n in onnx.load(str(path)).graph.node)
    return path


def test_a_vit_with_gelu_nodes_is_verified(gelu_vit_path: Path, tmp_path: Path) -> None:
    """At the default token layer (the block's ln_1): verified, and the gradients match
    torch's autograd. With a float32 Gelu in the float64 head (onnx's own expansion)
    this one-block ViT was refused (weights 1.5e-2 > 1e-3), as ViT-B and Swin were."""
    model = perturbed(vit)  # the same weights as the fixture's (seeded)
    result = export(gelu_vit_path, tmp_path / "bundle.onnx", gradient="analytic")
    assert result.report is not None and result.report.ok
    assert result.info.activation_layout == "ntc"
    batch, targets = images(), np.array([2, 4], np.int64)
    out = run_bundle(tmp_path / "bundle.onnx", batch, targets)
    want, _ = torch_gradients(model, batch, targets, model.encoder.layers[-1].ln_1)
    np.testing.assert_allclose(out[OUTPUT_GRADIENTS], want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(("op_type", "mutant"), [("Gelu", doubled), ("Softmax", doubled)])
def test_defects_in_a_gelu_vit_are_refused(gelu_vit_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, op_type: str,
                                           mutant: Mutant) -> None:
    """Behind the default token layer: the MLP's Gelu and the attention's Softmax."""
    replace_rule(monkeypatch, op_type, mutant)
    assert_refused(gelu_vit_path, tmp_path / "out" / "bundle.onnx", gradient="analytic")


def node_output(path: Path, name_part: str, op_type: str) -> str:
    """The last ``op_type`` node whose name contains ``name_part``: a layer to explain."""
    graph = onnx.load(str(path)).graph
    return [n.output[0] for n in graph.node if op_type == n.op_type and name_part in n.name][-1]


@pytest.mark.parametrize(("op_type", "mutant"), [
    ("Gemm", doubled), ("Add", first_branch_only), ("Relu", reversed_channels)])
def test_defects_in_resnet18_are_refused(resnet18_path: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, op_type: str,
                                         mutant: Mutant) -> None:
    """At layer4.0's output the head holds layer4.1: convolutions, ReLUs, a residual Add."""
    layer = node_output(resnet18_path, "/layer4/layer4.0/", "Relu")
    assert export(resnet18_path, tmp_path / "clean.onnx", layer=layer,
                  gradient="analytic").report.ok
    replace_rule(monkeypatch, op_type, mutant)
    assert_refused(resnet18_path, tmp_path / "out" / "bundle.onnx", layer=layer,
                   gradient="analytic")


@pytest.mark.parametrize(("op_type", "mutant"), [
    ("LayerNormalization", doubled), ("MatMul", doubled), ("Erf", doubled)])
def test_defects_in_a_vit_are_refused(vit_path: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, op_type: str,
                                      mutant: Mutant) -> None:
    """At the patch embedding the head is the whole encoder."""
    layer = node_output(vit_path, "conv_proj", "Conv")
    assert export(vit_path, tmp_path / "clean.onnx", layer=layer, gradient="analytic").report.ok
    replace_rule(monkeypatch, op_type, mutant)
    assert_refused(vit_path, tmp_path / "out" / "bundle.onnx", layer=layer, gradient="analytic")


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize(("kernel", "stride", "pad", "ceil", "include_pad"), [
    (3, 2, 1, 1, 0), (3, 2, 1, 1, 1), (3, 1, 1, 1, 0), (2, 2, 0, 1, 1), (5, 3, 2, 1, 0),
    (3, 2, 0, 0, 1)])
def test_float64_pools_match_torch(size: int, kernel: int, stride: int, pad: int, ceil: int,
                                   include_pad: int) -> None:
    """The head's float64 MaxPool and AveragePool, ceil_mode included (googlenet's
    padded ceil-mode pools), against torch's."""
    x = np.random.default_rng(size).standard_normal((2, 3, size, size))
    common = {"kernel_shape": [kernel, kernel], "strides": [stride, stride],
              "pads": [pad] * 4, "ceil_mode": ceil}
    pools = {"MaxPool": torch.nn.functional.max_pool2d(
                 torch.tensor(x), kernel, stride, pad, ceil_mode=bool(ceil)),
             "AveragePool": torch.nn.functional.avg_pool2d(
                 torch.tensor(x), kernel, stride, pad, ceil_mode=bool(ceil),
                 count_include_pad=bool(include_pad))}
    for op_type, want in pools.items():
        extra = {"count_include_pad": include_pad} if op_type == "AveragePool" else {}
        node = helper.make_node(op_type, ["x"], ["y"], **common, **extra)
        graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", 11, None)],
                                  [helper.make_tensor_value_info("y", 11, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        (got,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"x": x})
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("op_type", "mutant"), [
    ("LayerNormalization", doubled), ("MatMul", doubled), ("Erf", doubled)])
def test_defects_behind_a_token_layer_are_refused(vit_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  op_type: str, mutant: Mutant) -> None:
    """At the default layer, the block's first LayerNorm: a [N, T, C] token layer whose
    weights and cam are checked over the grid tokens alone."""
    clean = export(vit_path, tmp_path / "clean.onnx", gradient="analytic")
    assert clean.info.activation_layout == "ntc" and clean.report.ok
    replace_rule(monkeypatch, op_type, mutant)
    assert_refused(vit_path, tmp_path / "out" / "bundle.onnx", gradient="analytic")

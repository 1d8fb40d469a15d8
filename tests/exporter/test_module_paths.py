"""Layers of torch's ONNX files named by module path (``layer4.1``), from both exporters.

Tiny graphs built here carry module scopes the way each exporter writes them (the
TorchScript exporter in node names, dynamo in node metadata), with the module outputs
worked out by hand. torchvision's ResNet18 and a tiny ViT, exported by torch both
ways, must resolve module paths to the tensor that holds the module's output (found
by value with forward hooks, ``tests/zoo.py``), and ResNet18's ``layer4.1`` map must
equal pytorch-grad-cam's with ``target_layers=[model.layer4[-1]]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cam_references import assert_maps_close, source_outputs
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcam import export, read_bundle_info
from onnxcam.cli import main
from onnxcam.errors import LayerNotFoundError, UnsupportedModelError
from onnxcam.exporter import describe, list_layers
from onnxcam.exporter.module_paths import legacy_scope

CLASSES = 5
SCOPES = "pkg.torch.onnx.name_scopes"


# --------------------------------------------------------------------------- tiny graphs


# (op, legacy node name, dynamo name_scopes) of a stem, a two-block stage whose second
# block has a downsample list, a pool and a head. dynamo's scopes share one ReLU
# module, ``block.act``, between both blocks, as torchvision's BasicBlock shares relu.
NODES = (
    ("Conv", "/stem/Conv", ["", "stem", "conv2d"]),
    ("Conv", "/block/block.0/conv/Conv", ["", "block", "block.0", "block.0.conv", "conv2d_1"]),
    ("Relu", "/block/block.0/relu/Relu", ["", "block", "block.act", "relu"]),
    ("Conv", "/block/block.1/down/down.0/Conv",
     ["", "block", "block.1", "block.1.down", "block.1.down.0", "conv2d_2"]),
    ("Relu", "/block/block.1/relu/Relu", ["", "block", "block.act", "relu_1"]),
    ("GlobalAveragePool", "/pool/GlobalAveragePool", ["", "pool", "mean"]),
    ("Flatten", "/Flatten", ["", "view"]),
    ("Gemm", "/fc/Gemm", ["", "fc", "linear"]),
)
# What each exporter's file says each tensor is the output of, outermost first.
LEGACY_MODULES = [("stem",), ("block.0.conv",), ("block.0", "block.0.relu"),
                  ("block.1.down", "block.1.down.0"), ("block", "block.1", "block.1.relu"),
                  ("pool",), (), ("fc",)]
DYNAMO_MODULES = [("stem",), ("block.0", "block.0.conv"), ("block.act",),
                  ("block.1", "block.1.down", "block.1.down.0"), ("block", "block.act"),
                  ("pool",), (), ("fc",)]


def tiny_torch_file(folder: Path, exporter: str, producer: str = "pytorch") -> Path:
    """The tiny stage as ``exporter`` ("legacy" or "dynamo") would write it."""
    rng = np.random.default_rng(3)
    weights = {"w0": (6, 3, 3, 3), "w1": (6, 6, 3, 3), "w2": (8, 6, 3, 3), "wfc": (CLASSES, 8)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
             for name, shape in weights.items()]
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, CLASSES).astype(np.float32), "bfc"))
    extra = {"w0": ["w0"], "w1": ["w1"], "w2": ["w2"], "wfc": ["wfc", "bfc"]}
    operands = iter([extra["w0"], extra["w1"], [], extra["w2"], [], [], [], extra["wfc"]])
    nodes, tensor = [], "input"
    for index, (op, legacy_name, scopes) in enumerate(NODES):
        output = f"t{index}" if index < len(NODES) - 1 else "out"
        kwargs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {}
        name = legacy_name if exporter == "legacy" else f"node_{scopes[-1]}"
        node = helper.make_node(op, [tensor, *next(operands)], [output], name=name,
                                **({"transB": 1} if op == "Gemm" else kwargs))
        if exporter == "dynamo":
            node.metadata_props.add(key=SCOPES, value=repr(scopes))
        nodes.append(node)
        tensor = output
    # The TorchScript exporter adds unscoped Shape nodes that read tensors deep inside a
    # block (Swin's attention mask): they do not make a tensor a module's output.
    nodes.insert(2, helper.make_node("Shape", ["t1"], ["t1_shape"], name="Shape_9"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name=producer)
    model.ir_version = 8
    path = folder / f"tiny-{exporter}-{producer}.onnx"
    onnx.save(model, str(path))
    return path


def invoke(*args: object) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def module_column(line: str) -> list[str]:
    """The module paths ``onnxcam layers`` lists after a layer's shape."""
    fields = line[2:].split(None, 3)  # after the default's mark
    rest = fields[3] if len(fields) == 4 else ""
    if rest.startswith("(tokens:"):  # a token layer's grid comes first
        rest = rest.split(")", 1)[1]
    return rest.strip().split(", ") if rest.strip() else []


@pytest.mark.parametrize(("name", "path"), [
    ("/layer4/layer4.1/relu_1/Relu", "layer4.1.relu_1"),
    ("/layer3/layer3.0/downsample/downsample.0/Conv", "layer3.0.downsample.0"),
    ("/features/features.7/features.7.1/norm1/LayerNormalization", "features.7.1.norm1"),
    ("/encoder/layers/encoder_layer_11/ln_1/LayerNormalization",
     "encoder.layers.encoder_layer_11.ln_1"),
    ("/0/0.1/Conv", "0.1"),  # a bare Sequential's children are all numbers
    ("/Flatten", ""),
])
def test_legacy_node_names_read_as_module_paths(name: str, path: str) -> None:
    assert legacy_scope(name) == path


@pytest.mark.parametrize(("exporter", "expected"),
                         [("legacy", LEGACY_MODULES), ("dynamo", DYNAMO_MODULES)])
def test_each_layer_lists_the_modules_it_is_the_output_of(
        tmp_path: Path, exporter: str, expected: list[tuple[str, ...]]) -> None:
    layers = list_layers(tiny_torch_file(tmp_path, exporter))
    assert [layer.modules for layer in layers] == expected


def test_other_tools_node_names_are_no_module_paths(tmp_path: Path) -> None:
    src = tiny_torch_file(tmp_path, "legacy", producer="tf2onnx")
    assert all(not layer.modules for layer in list_layers(src))
    with pytest.raises(LayerNotFoundError, match="no layer named 'block.0'"):
        export(src, tmp_path / "out.cam.onnx", layer="block.0")


def test_layers_shows_module_paths_after_the_shape(tmp_path: Path) -> None:
    result = invoke("layers", tiny_torch_file(tmp_path, "legacy"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line[2:].split()[0] for line in lines] == [name for _, name, _ in NODES[:5]]
    (default,) = [line for line in lines if line.startswith("*")]
    assert default.split()[1:4] == ["/block/block.1/relu/Relu", "Relu", "8x8x8"]
    assert module_column(default) == ["block", "block.1", "block.1.relu"]
    assert module_column(lines[3]) == ["block.1.down", "block.1.down.0"]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_module_path_picks_its_output_tensor(tmp_path: Path, exporter: str) -> None:
    """``block.0`` is the ReLU (legacy) or the Conv (dynamo, whose ReLU is the shared
    ``block.act``); the bundle records that node, and its activations are that tensor."""
    src = tiny_torch_file(tmp_path, exporter)
    tensor = "t2" if exporter == "legacy" else "t1"
    by_path, by_tensor = tmp_path / "path.cam.onnx", tmp_path / "tensor.cam.onnx"
    result = invoke("export", src, "-o", by_path, "--layer", "block.0", "--preprocess", "none")
    assert result.exit_code == 0, result.output
    export(src, by_tensor, layer=tensor, preprocess="none")
    node = next(node.name for node in onnx.load(str(src)).graph.node if node.output[0] == tensor)
    assert read_bundle_info(by_path).target_layer == read_bundle_info(by_tensor).target_layer \
        == node
    image = np.random.default_rng(5).integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)
    (want,) = source_outputs(onnx.load(str(src)), [tensor])(
        image.transpose(0, 3, 1, 2).astype(np.float32))
    import onnxruntime as ort

    session = ort.InferenceSession(str(by_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["activations"], {"image": image, "target": np.array([3])})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_a_module_that_runs_twice_is_ambiguous(tmp_path: Path) -> None:
    src = tiny_torch_file(tmp_path, "dynamo")
    result = invoke("export", src, "-o", tmp_path / "out.cam.onnx", "--layer", "block.act")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line == ("onnxcam: error: module 'block.act' has 2 outputs (it runs more than "
                    "once, or returns several tensors): t2, t4; pass one of these tensors "
                    "instead")


@pytest.mark.parametrize(("asked", "hint"), [("blok.1", "did you mean 'block.1'"),
                                             ("block.1.dwn", "did you mean 'block.1.down'")])
def test_an_unknown_module_path_suggests_near_ones(tmp_path: Path, asked: str,
                                                   hint: str) -> None:
    src = tiny_torch_file(tmp_path, "legacy")
    with pytest.raises(LayerNotFoundError, match=hint):
        export(src, tmp_path / "out.cam.onnx", layer=asked)


def test_a_module_path_to_a_pooled_vector_needs_a_map(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"'pool' has output shape \[1, 8, 1, 1\]"):
        export(tiny_torch_file(tmp_path, "legacy"), tmp_path / "out.cam.onnx", layer="pool")


# --------------------------------------------------------------------------- torchvision


class Exports:
    """A torchvision model, perturbed, and its ONNX files from both exporters."""

    def __init__(self, entry: Any, folder: Path) -> None:
        import zoo

        self.entry = entry
        self.model = entry.model()
        self.example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
        self.files = {exporter: zoo.export_torch(entry, self.model, exporter,
                                                 folder / f"{entry.name}-{exporter}.onnx")
                      for exporter in ("legacy", "dynamo")}

    def holding(self, exporter: str, path: str) -> str:
        """The tensor that holds module ``path``'s output, found by value."""
        import zoo

        return zoo.onnx_layer_name(self.files[exporter], self.model, path, self.example)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    import zoo

    return Exports(zoo.ZOO["resnet18"], tmp_path_factory.mktemp("resnet18"))


def layer_named(layers: Sequence[Any], tensor: str) -> Any:
    return next(layer for layer in layers if layer.tensor == tensor)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_resnet18_layers_lists_its_blocks(resnet18: Exports, exporter: str) -> None:
    layers = list_layers(resnet18.files[exporter])
    lines = describe(layers)
    (default,) = [line for line in lines if line.startswith("*")]
    shared_relu = "layer4.1.relu_1" if exporter == "legacy" else "layer4.1.relu"
    assert module_column(default) == ["layer4", "layer4.1", shared_relu]
    listed = {path for line in lines for path in module_column(line)}
    assert {"layer1.0", "layer2.1", "layer3.0.downsample", "layer4.0", "layer4.1.bn2"
            if exporter == "dynamo" else "layer4.1.conv2"} <= listed
    for path in ("layer4.1", "layer3.0", "layer2"):
        (made,) = [layer for layer in layers if path in layer.modules]
        assert made.tensor == resnet18.holding(exporter, path), path


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_resnet18_layer4_1_matches_pytorch_grad_cam(resnet18: Exports, tmp_path: Path,
                                                    exporter: str) -> None:
    import zoo

    source = resnet18.files[exporter]
    result = export(source, tmp_path / "r18.cam.onnx", layer="layer4.1",
                    preprocess=zoo.PREPROCESS, gradient="analytic")
    usual = layer_named(list_layers(source), resnet18.holding(exporter, "layer4.1"))
    assert result.info.target_layer == usual.name
    batch = zoo.images(resnet18.entry.size)
    targets = zoo.telling_targets(resnet18.entry, resnet18.model, batch)
    reference = zoo.raw_grad_cam(resnet18.model, resnet18.model.layer4[-1],
                                 zoo.torch_input(batch), targets)
    assert ((reference > 0).sum(axis=(1, 2)) >= 2).all(), "reference maps nearly empty"
    assert_maps_close(zoo.onnxcam_maps(result.path, batch, targets), reference, rtol=1e-4)


@pytest.mark.torch
@pytest.mark.slow
def test_dynamo_shared_relu_is_ambiguous(resnet18: Exports, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError,
                       match=r"'layer4.1.relu' has 2 outputs .*: relu_15, relu_16;"):
        export(resnet18.files["dynamo"], tmp_path / "out.cam.onnx", layer="layer4.1.relu")


@pytest.mark.torch
@pytest.mark.slow
def test_a_module_in_memory_lists_the_paths_its_layer_is_found_by(resnet18: Exports) -> None:
    """The in-memory route finds ``layer4.1`` by value; its file's scopes agree."""
    from onnxcam.exporter.pipeline import load_source

    source = load_source(resnet18.model, "layer4.1", example=resnet18.example)
    assert source.layer == "layer4.1"
    chosen = layer_named(source.layers, source.activation)
    assert chosen.modules == ("layer4", "layer4.1", "layer4.1.relu_1")


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_tiny_vit_block_paths(tmp_path: Path, exporter: str) -> None:
    """A transformer's paths: the last block's ``ln_1`` (the default) and the block."""
    torchvision = pytest.importorskip("torchvision")
    import zoo

    def tiny_vit() -> Any:
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
            num_classes=CLASSES)

    entry = zoo.ZooModel("tiny_vit", tiny_vit, 32, "encoder.layers.encoder_layer_1.ln_1", "vit")
    model = entry.model()
    example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    src = zoo.export_torch(entry, model, exporter, tmp_path / f"vit-{exporter}.onnx")
    layers = list_layers(src)
    for path in (entry.layer, "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_0"):
        (made,) = [layer for layer in layers if path in layer.modules]
        assert made.tensor == zoo.onnx_layer_name(src, model, path, example), path
    (default,) = [line for line in describe(layers) if line.startswith("*")]
    assert entry.layer in module_column(default)


@pytest.mark.torch
def test_a_module_in_memory_is_found_inside_a_list_attribute() -> None:
    """The TorchScript exporter writes ``block.down``'s ReLU as
    ``/block/down/down.1/Relu``; a ReLU after the block gives the same values, and the
    tensor inside the module is the one taken."""
    torch = pytest.importorskip("torch")
    from onnxcam.exporter.pipeline import load_source

    class Block(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.down = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1),
                                            torch.nn.ReLU())

        def forward(self, x: Any) -> Any:
            return self.down(x)

    torch.manual_seed(2)
    net = torch.nn.Sequential()
    net.add_module("block", Block())
    net.add_module("after", torch.nn.ReLU())  # relu(relu(x)) == relu(x)
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    net.add_module("fc", torch.nn.Linear(6, CLASSES))
    source = load_source(net.eval(), "block.down", example=torch.randn(1, 3, 8, 8))
    assert source.activation == "/block/down/down.1/Relu_output_0"


def test_scopes_are_kept_per_node_not_per_wrapper() -> None:
    """protobuf hands out a fresh wrapper for each access to ``graph.node``, and a freed
    wrapper's id() is reused: scopes keyed on id() mixed up nodes (or raised KeyError).
    Every module of a chain keeps its own output."""
    from onnxcam.exporter.module_paths import module_outputs

    names = [f"block{i}" for i in range(6)]
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"/{name}/Relu")
             for i, name in enumerate(names)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("t6", TensorProto.FLOAT, [1, 2])])
    found = module_outputs(graph, True, {f"t{i}" for i in range(7)})
    assert {name: found[name] for name in names} == {
        name: [f"t{i + 1}"] for i, name in enumerate(names)}

"""Which output holds the class scores: several outputs refused or chosen with
``logits=`` / ``--logits``, dense outputs and bundles refused with what is true, and an
ONNX file newer than onnxruntime brought down to the IR version it reads.

References are the source models themselves, run in onnxruntime (or torch, Keras)
on the same images; never the code under test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cli import main
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter import describe, export, list_layers

SIZE = 8


def _weights(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(0.0, 0.5, shape).astype(np.float32), name)


def _model(nodes: list, outputs: list[tuple[str, list]], inits: list, name: str,
           ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def _head(x: str, cin: int, classes: int, out: str, tag: str, rng: np.random.Generator
          ) -> tuple[list, list]:
    nodes = [helper.make_node("GlobalAveragePool", [x], [f"{tag}_gap"], name=f"{tag}_gap"),
             helper.make_node("Flatten", [f"{tag}_gap"], [f"{tag}_flat"], name=f"{tag}_flat"),
             helper.make_node("Gemm", [f"{tag}_flat", f"{tag}.w", f"{tag}.b"], [out],
                              name=f"{tag}_fc", transB=1)]
    return nodes, [_weights(rng, f"{tag}.w", (classes, cin)), _weights(rng, f"{tag}.b", (classes,))]


def _trunk(rng: np.random.Generator) -> tuple[list, list]:
    """conv1 -> relu1 (early) -> conv2 -> relu2 (late)."""
    nodes = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["conv1"], name="conv1",
                              pads=[1] * 4),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("Conv", ["relu1", "c2.w", "c2.b"], ["conv2"], name="conv2",
                              pads=[1] * 4),
             helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2")]
    inits = [_weights(rng, "c1.w", (6, 3, 3, 3)), _weights(rng, "c1.b", (6,)),
             _weights(rng, "c2.w", (7, 6, 3, 3)), _weights(rng, "c2.b", (7,))]
    return nodes, inits


def boxes_and_scores(ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """Outputs ``boxes`` [N, 4] (from the late relu2) first, then ``scores`` [N, 5]
    (from the early relu1): the first output is not the classifier."""
    rng = np.random.default_rng(7)
    nodes, inits = _trunk(rng)
    for x, cin, classes, out, tag in (("relu2", 7, 4, "boxes", "box"),
                                      ("relu1", 6, 5, "scores", "cls")):
        more_nodes, more_inits = _head(x, cin, classes, out, tag, rng)
        nodes += more_nodes
        inits += more_inits
    return _model(nodes, [("boxes", ["N", 4]), ("scores", ["N", 5])], inits, "two_heads",
                  ir_version, opset)


def scores_only(ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """``boxes_and_scores`` without its ``boxes`` output: a plain classifier."""
    model = boxes_and_scores(ir_version, opset)
    del model.graph.output[0]
    return model


def dense_output() -> onnx.ModelProto:
    """A dense output of rank 3: the trunk, a conv to a 2-channel map, flattened to
    ``mask`` [N, 2, 64] (rank 4 would read as a segmenter's scores per pixel)."""
    rng = np.random.default_rng(8)
    nodes, inits = _trunk(rng)
    nodes.append(helper.make_node("Conv", ["relu2", "m.w", "m.b"], ["map"], name="mask_conv",
                                  pads=[1] * 4))
    nodes.append(helper.make_node("Reshape", ["map", "m.shape"], ["mask"], name="flatten"))
    inits += [_weights(rng, "m.w", (2, 7, 3, 3)), _weights(rng, "m.b", (2,)),
              numpy_helper.from_array(np.array([0, 2, SIZE * SIZE], np.int64), "m.shape")]
    return _model(nodes, [("mask", ["N", 2, SIZE * SIZE])], inits, "dense")


def images(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def bundle_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": batch,
                                    "target": -np.ones(len(batch), np.int64)})[0]


def source_output(model: onnx.ModelProto, name: str, batch: np.ndarray) -> np.ndarray:
    """The source model's output ``name`` in onnxruntime, on ``batch`` as ``unit``
    preprocessing gives it (x / 255, NCHW)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (batch.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    return session.run([name], {"input": np.ascontiguousarray(x)})[0]


def runtime_max_ir() -> int:
    """The newest IR version onnxruntime reads, as its own refusal states it."""
    probe = boxes_and_scores(ir_version=99)
    with pytest.raises(Exception, match="max supported IR version") as caught:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    found = re.search(r"max supported IR version: (\d+)", str(caught.value))
    assert found is not None
    return int(found.group(1))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    onnx.save(boxes_and_scores(), str(folder / "two.onnx"))
    onnx.save(dense_output(), str(folder / "dense.onnx"))
    onnx.save(scores_only(), str(folder / "scores.onnx"))
    return folder


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcam: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def starred(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("*")]


# ------------------------------------------------------------------ several outputs


def test_several_outputs_are_refused_naming_them(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.onnx"
    for call in (lambda: export(sources / "two.onnx", out),
                 lambda: list_layers(sources / "two.onnx")):
        with pytest.raises(UnsupportedModelError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        for needle in ("2 outputs", "boxes [1, 4]", "scores [1, 5]", "--logits NAME",
                       "logits=NAME"):
            assert needle in message, message
    assert not out.exists()


def test_logits_builds_the_bundle_from_that_output(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.onnx"
    info = export(sources / "two.onnx", out, logits="scores").info
    assert info.num_classes == 5
    assert info.target_layer == "relu1"  # the map the scores read, not the boxes' relu2
    batch = images()
    expected = source_output(boxes_and_scores(), "scores", batch)
    np.testing.assert_allclose(bundle_logits(out, batch), expected, rtol=1e-5, atol=1e-6)


def test_the_default_layer_follows_the_chosen_output(sources: Path) -> None:
    path = sources / "two.onnx"
    assert starred("\n".join(describe(list_layers(path, logits="scores")))) == ["relu1"]
    assert starred("\n".join(describe(list_layers(path, logits="boxes")))) == ["relu2"]


def test_an_unknown_output_name_lists_the_outputs(sources: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError,
                       match=r"no output named 'probs'; the model's outputs: boxes \[1, 4\], "
                             r"scores \[1, 5\]$"):
        export(sources / "two.onnx", tmp_path / "b.onnx", logits="probs")


def test_a_single_output_may_be_named(sources: Path, tmp_path: Path) -> None:
    path = sources / "scores.onnx"
    assert export(path, tmp_path / "a.onnx", logits="scores").info.num_classes == 5
    with pytest.raises(UnsupportedModelError, match=r"outputs: scores \[1, 5\]"):
        list_layers(path, logits="boxes")


def test_cli_logits_option(sources: Path, tmp_path: Path) -> None:
    message = one_line_error(invoke("layers", sources / "two.onnx"))
    assert "boxes [1, 4], scores [1, 5]" in message
    listed = invoke("layers", sources / "two.onnx", "--logits", "boxes")
    assert listed.exit_code == 0, listed.output
    assert starred(listed.stdout) == ["relu2"]
    out = tmp_path / "boxes.onnx"
    written = invoke("export", sources / "two.onnx", "-o", out, "--logits", "boxes")
    assert written.exit_code == 0, written.output
    assert written.stdout.startswith(f"wrote {out}: layer relu2, 4 classes")
    batch = images(seed=1)
    np.testing.assert_allclose(bundle_logits(out, batch),
                               source_output(boxes_and_scores(), "boxes", batch),
                               rtol=1e-5, atol=1e-6)
    assert "the model's outputs: boxes" in one_line_error(
        invoke("export", sources / "two.onnx", "-o", tmp_path / "x.onnx", "--logits", "box"))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.torch
@pytest.mark.slow
def test_a_torch_module_returning_a_tuple(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1),
                                                torch.nn.ReLU())
            self.boxes = torch.nn.Linear(6, 4)
            self.scores = torch.nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.features(x).mean(dim=(2, 3))
            return self.boxes(pooled), self.scores(pooled)

    torch.manual_seed(3)
    module = TwoHeads()
    example = torch.rand(1, 3, SIZE, SIZE)
    with pytest.raises(UnsupportedModelError,
                       match=r"2 outputs: output\.0 \[1, 4\], output\.1 \[1, 5\]"):
        export(module, tmp_path / "a.onnx", example=example)
    out = tmp_path / "scores.onnx"
    assert export(module, out, example=example, logits="output.1").info.num_classes == 5
    batch = images(seed=2)
    x = torch.from_numpy(batch.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = module(x)[1].double().numpy()
    np.testing.assert_allclose(bundle_logits(out, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.tf
@pytest.mark.slow
def test_a_keras_model_with_two_outputs(tmp_path: Path) -> None:
    from models import _keras

    keras = _keras()
    image = keras.Input((SIZE, SIZE, 3), name="image_in")
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    boxes = keras.layers.Dense(4, name="boxes")(pooled)
    scores = keras.layers.Dense(5, activation="softmax", name="scores")(pooled)
    model = keras.Model(image, [boxes, scores])
    for index, weight in enumerate(model.weights):  # no two parameter tensors equal
        rng = np.random.default_rng(index)
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    path = tmp_path / "two.keras"
    model.save(str(path))
    with pytest.raises(UnsupportedModelError,
                       match=r"2 outputs: boxes \[1, 4\], scores \[1, 5\]"):
        list_layers(path)
    out = tmp_path / "scores.onnx"
    info = export(path, out, logits="scores").info
    assert (info.num_classes, info.target_layer, info.removed_activation) == (5, "conv",
                                                                              "Softmax")
    batch = images(seed=4)
    logits = bundle_logits(out, batch).astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    expected = model.predict(batch.astype(np.float32) / 255.0, verbose=0)[1]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ dense outputs


def test_a_dense_output_is_refused_alike_by_export_and_layers(sources: Path,
                                                              tmp_path: Path) -> None:
    exported = one_line_error(invoke("export", sources / "dense.onnx", "-o", tmp_path / "d.onnx"))
    listed = one_line_error(invoke("layers", sources / "dense.onnx"))  # no default marked
    assert exported == listed
    for needle in ("mask", "[1, 2, 64]", "neither a score vector [N, classes]",
                   "per-pixel scores [N, classes, h, w] (segmentation)"):
        assert needle in exported, exported
    assert not (tmp_path / "d.onnx").exists()


# ------------------------------------------------------------------ bundles as sources


def test_a_bundle_is_not_exported_again(sources: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "made.onnx"
    export(sources / "scores.onnx", bundle, layer=["relu1", "conv1"])
    for args in (("layers", bundle), ("export", bundle, "-o", tmp_path / "again.onnx")):
        message = one_line_error(invoke(*args))
        assert f"{bundle} is already an onnxcam bundle" in message
        assert "(exported layers: conv1, relu1)" in message  # early to late
        assert f"onnxcam explain {bundle}" in message
        assert "inputs" not in message
    assert not (tmp_path / "again.onnx").exists()
    with pytest.raises(UnsupportedModelError, match="already an onnxcam bundle"):
        onnxcam.export(onnx.load(str(bundle)), tmp_path / "again.onnx")


# ------------------------------------------------------------------ IR versions


def test_a_newer_ir_version_is_lowered_to_what_onnxruntime_reads(tmp_path: Path) -> None:
    newest = runtime_max_ir()
    path = tmp_path / "newer.onnx"
    onnx.save(scores_only(ir_version=newest + 1), str(path))  # 14, as onnx 1.23 writes
    out = tmp_path / "bundle.onnx"
    export(path, out)
    assert onnx.load(str(out)).ir_version == newest
    batch = images(seed=5)
    expected = source_output(scores_only(ir_version=8), "scores", batch)
    np.testing.assert_allclose(bundle_logits(out, batch), expected, rtol=1e-5, atol=1e-6)


def test_an_ir_version_the_opset_needs_is_refused_in_one_line(tmp_path: Path) -> None:
    newest = runtime_max_ir()
    needing = [(ir, opset) for _, ir, opset, *_ in helper.VERSION_TABLE if ir > newest]
    if not needing:
        pytest.skip("onnxruntime reads every IR version this onnx knows")
    ir_version, opset = needing[0]
    path = tmp_path / "too_new.onnx"
    onnx.save(scores_only(ir_version=ir_version, opset=opset), str(path))
    message = one_line_error(invoke("layers", path))
    assert f"IR version {ir_version}" in message
    assert f"(IR version {newest})" in message
    assert "onnxruntime" in message and "ONNXRuntimeError" not in message

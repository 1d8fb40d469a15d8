"""Fixed-batch exports (issue 10, item 1): freed where a run proves it, else run in chunks.

Every model here is exported at batch 1 and explained at larger batches; the
numbers are held against the source run one image at a time (onnxruntime on the
original file, or torch), and against numpy's Grad-CAM from the source's own
head where it is linear.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam import Explainer
from onnxcam.bundle import INPUT_IMAGE, BundleInfo, read_bundle_info
from onnxcam.errors import ExportError
from onnxcam.exporter import batch as batch_module
from onnxcam.exporter.batch import NotProved, free_batch, prove, rewrite_shape_operands
from onnxcam.runtime import cpu_session

SIZE = 8
CHANNELS = 4
CLASSES = 5
RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32)
DENSE = (RNG.normal(size=(CLASSES, CHANNELS * SIZE * SIZE)) * 0.1).astype(np.float32)


def reshape_model(mix: bool = False, allowzero: int = 0) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv -> Relu ("r", the layer) -> Reshape [1, -1] -> Gemm.

    ``mix`` puts a Transpose that moves the batch to axis 1 before the Reshape: at
    batch 1 the same numbers, at any other batch a mix of samples, so its batch
    cannot be freed.
    """
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    flat_input = "r"
    if mix:
        nodes.append(helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0, 2, 3]))
        flat_input = "t"
    nodes += [helper.make_node("Reshape", [flat_input, "shape"], ["f"], allowzero=allowzero),
              helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    target = [1, CHANNELS * SIZE * SIZE] if allowzero else [1, -1]
    graph = helper.make_graph(
        nodes, "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(CONV, "w"), numpy_helper.from_array(DENSE, "g"),
         numpy_helper.from_array(np.array(target, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def nchw_inputs(count: int) -> np.ndarray:
    return np.random.default_rng(count).normal(size=(count, 3, SIZE, SIZE)).astype(np.float32)


def per_image(model: onnx.ModelProto, inputs: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """``outputs`` of ``model`` run on each input alone (its own batch of 1), stacked."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in outputs:
        if name not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    session = cpu_session(probe.SerializeToString())
    runs = [session.run(outputs, {"x": image[None]}) for image in inputs]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(outputs))]


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def unit_nchw(batch: np.ndarray) -> np.ndarray:
    """What a ``preprocess="unit"`` bundle feeds the model."""
    return np.ascontiguousarray((batch.astype(np.float32) / 255).transpose(0, 3, 1, 2))


def numpy_gradcam(model: onnx.ModelProto, batch: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and Grad-CAM of ``reshape_model`` from the source, one image at a time:
    the head is Dense on the flattened map (in the order the model flattens it), so
    d logit_k / d r is row k of the Dense weights laid out as the map."""
    logits, maps = per_image(model, unit_nchw(batch), ["y", "r"])
    cams = []
    for n, target in enumerate(targets):
        gradient = DENSE[target].reshape(CHANNELS, SIZE, SIZE)  # batch 1: any flatten order
        weights = gradient.mean(axis=(1, 2))
        cams.append(np.maximum(np.einsum("chw,c->hw", maps[n], weights), 0))
    return logits, np.array(cams)


# --------------------------------------------------------------------------- the rule


def test_a_baked_reshape_is_freed_and_proved_per_sample() -> None:
    plan = free_batch(reshape_model(), nchw_inputs)
    assert plan.fixed == 0 and len(plan.rewritten) == 1
    freed = plan.model
    shape = next(t for t in freed.graph.initializer if t.name.endswith("__any_batch"))
    assert numpy_helper.to_array(shape).tolist() == [0, -1]
    inputs = nchw_inputs(5)
    (got,) = cpu_session(freed.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(reshape_model(), inputs, ["y"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_batch_mixing_model_keeps_its_batch() -> None:
    plan = free_batch(reshape_model(mix=True), nchw_inputs)
    assert plan.fixed == 1
    assert "batch size 2" in plan.reason
    assert plan.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_mutation_a_rule_without_its_condition_is_caught_by_the_proof(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Break the rule (rewrite whatever the data's batch axis) on the mixing model: the
    rewritten graph runs at batch 2, and only the per-sample comparison can tell."""
    original = reshape_model(mix=True, allowzero=1)
    monkeypatch.setattr(batch_module, "_fixed_after_batch", lambda shape: True)
    candidate = onnx.ModelProto()
    candidate.CopyFrom(original)
    batch_module.set_batch_dim(candidate, batch_module.BATCH_SYMBOL)
    assert rewrite_shape_operands(candidate, 1)  # the broken rule fires
    session = cpu_session(candidate.SerializeToString())
    assert session.run(["y"], {"x": nchw_inputs(2)})[0].shape == (2, CLASSES)  # and runs
    with pytest.raises(NotProved, match="differs from per-sample runs"):
        prove(original, candidate, 1, nchw_inputs)
    assert free_batch(original, nchw_inputs).fixed == 1
    monkeypatch.undo()
    assert free_batch(original, nchw_inputs).fixed == 1  # the real condition refuses it


# --------------------------------------------------------------------------- bundles


def export_onnx(tmp_path: Path, model: onnx.ModelProto, **options: Any) -> Path:
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    out = tmp_path / "model.cam.onnx"
    onnxcam.export(source, out, layer="r", **options)
    return out


def test_freed_bundle_matches_the_source_per_image(tmp_path: Path) -> None:
    bundle = export_onnx(tmp_path, reshape_model())  # verification on
    assert read_bundle_info(bundle).batch_size == 0
    batch, targets = images(5), np.array([0, 1, 2, 3, 4])
    result = Explainer(bundle, device="cpu").explain(batch, targets, batch_size=5)
    logits, cams = numpy_gradcam(reshape_model(), batch, targets)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(result.raw, cams, rtol=1e-4, atol=1e-4 * cams.max())


def test_fixed_batch_bundle_refuses_verification_clearly(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="batch size 1 only"):
        export_onnx(tmp_path, reshape_model(mix=True))
    assert not (tmp_path / "model.cam.onnx").exists()


@pytest.fixture(scope="module")
def fixed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fixed")
    return export_onnx(folder, reshape_model(mix=True), verify=False, input_gradients=True)


def test_fixed_batch_is_recorded_and_pinned(fixed_bundle: Path) -> None:
    assert read_bundle_info(fixed_bundle).batch_size == 1
    model = onnx.load(str(fixed_bundle))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxcam.batch_size"] == "1"
    image = next(i for i in model.graph.input if i.name == INPUT_IMAGE)
    assert image.type.tensor_type.shape.dim[0].dim_value == 1


def test_fixed_batch_bundle_matches_the_source(fixed_bundle: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="onnxcam.worker.sessions"):
        explainer = Explainer(fixed_bundle, device="cpu")
    assert sum("runs at batch size 1 only" in r.getMessage() for r in caplog.records) == 1
    batch, targets = images(5), np.array([4, 3, 2, 1, 0])
    result = explainer.explain(batch, targets, batch_size=4)  # 4 + 1: chunks of 1
    logits, cams = numpy_gradcam(reshape_model(mix=True), batch, targets)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(result.raw, cams, rtol=1e-4, atol=1e-4 * cams.max())


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "layercam", "saliency"])
def test_fixed_batch_maps_do_not_depend_on_the_batch(fixed_bundle: Path, method: str) -> None:
    explainer = Explainer(fixed_bundle, device="cpu")
    batch, targets = images(5, seed=3), [0, 1, 2, 3, 4]
    together = explainer.explain(batch, targets, method=method, batch_size=5)
    alone = [explainer.explain(batch[n : n + 1], targets[n], method=method) for n in range(5)]
    np.testing.assert_allclose(together.raw, np.concatenate([a.raw for a in alone]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together.logits, np.concatenate([a.logits for a in alone]),
                               rtol=1e-5, atol=1e-6)
    assert float(np.abs(together.raw).max()) > 0


def test_batch_size_is_written_only_when_fixed(fixed_bundle: Path) -> None:
    info = read_bundle_info(fixed_bundle)
    loose = dataclasses.replace(info, batch_size=0)
    assert "onnxcam.batch_size" not in loose.to_metadata()  # older bundles read the same
    assert BundleInfo.from_metadata(loose.to_metadata()).batch_size == 0
    assert BundleInfo.from_metadata(info.to_metadata()).batch_size == 1

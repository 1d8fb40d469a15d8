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
from baked import (
    CHANNELS,
    CLASSES,
    CONV,
    DENSE,
    SIZE,
    UPSAMPLED,
    class_token_model,
    images,
    nchw_inputs,
    numpy_gradcam,
    per_image,
    region_gradcam,
    reshape_model,
    resize_model,
    unit_nchw,
    upsample_reshape_model,
)
from onnx import numpy_helper

import onnxcam
from onnxcam import Contrast, Explainer
from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_CAM,
    OUTPUT_INPUT_GRADIENTS,
    BundleInfo,
    read_bundle_info,
)
from onnxcam.errors import VerificationError
from onnxcam.exporter import batch as batch_module
from onnxcam.exporter.batch import NotProved, free_batch, prove, rewrite_shape_operands
from onnxcam.runtime import cpu_session, run_in_chunks

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


def test_a_freed_model_keeps_its_own_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rewrite and the proof work on a copy whose weights are external stubs,
    read from a file (here every tensor over 64 bytes); the freed model gets its
    own weights back, inline, and is the model it was."""
    from onnxcam.exporter import shapes

    monkeypatch.setattr(shapes, "LARGE_TENSOR_BYTES", 64)
    plan = free_batch(reshape_model(), nchw_inputs)
    assert plan.fixed == 0
    tensors = {t.name: t for t in plan.model.graph.initializer}
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in tensors.values())
    np.testing.assert_array_equal(numpy_helper.to_array(tensors["w"]), CONV)
    np.testing.assert_array_equal(numpy_helper.to_array(tensors["g"]), DENSE)
    inputs = nchw_inputs(4)
    (got,) = cpu_session(plan.model.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(reshape_model(), inputs, ["y"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_class_token_is_expanded_to_the_batch() -> None:
    """The Reshape frees the tokens; the batch-1 token concatenated with them then
    gets one copy per sample (ViT's pattern)."""
    plan = free_batch(class_token_model(), nchw_inputs)
    assert plan.fixed == 0 and len(plan.rewritten) == 2
    assert sum(node.op_type == "Expand" for node in plan.model.graph.node) == 1
    inputs = nchw_inputs(4)
    (got,) = cpu_session(plan.model.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(class_token_model(), inputs, ["y"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_resize_with_the_batch_in_its_sizes_is_freed_and_proved_per_sample() -> None:
    """torch's dynamo exporter upsamples a segmenter's logits by constant sizes that
    start with the batch; they are built from the data's batch instead."""
    plan = free_batch(resize_model(), nchw_inputs)
    assert plan.fixed == 0 and len(plan.rewritten) == 1
    resize = next(node for node in plan.model.graph.node if node.op_type == "Resize")
    assert resize.input[3] != "sizes"
    inputs = nchw_inputs(4)
    (got,) = cpu_session(plan.model.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(resize_model(), inputs, ["y"])
    assert got.shape == (4, CLASSES, 2 * SIZE, 2 * SIZE)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_reshape_after_an_upsampling_by_scales_is_freed() -> None:
    """ultralytics' static YOLO: shape inference loses the batch at the neck's Resize by
    scales [1, 1, 2, 2]; declared kept there, the Detect head's Reshape to [1, C, -1]
    downstream is freed (the Resize itself is not rewritten)."""
    plan = free_batch(upsample_reshape_model(), nchw_inputs)
    assert plan.fixed == 0 and len(plan.rewritten) == 1
    reshape = next(node for node in plan.model.graph.node if node.op_type == "Reshape")
    shape = next(t for t in plan.model.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(shape).tolist() == [0, CHANNELS, -1]
    inputs = nchw_inputs(4)
    (got,) = cpu_session(plan.model.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(upsample_reshape_model(), inputs, ["y"])
    assert got.shape == (4, CLASSES, UPSAMPLED * UPSAMPLED)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_batch_mixing_model_keeps_its_batch() -> None:
    plan = free_batch(reshape_model(mix=True), nchw_inputs)
    assert plan.fixed == 1
    assert "batch size 2" in plan.reason
    assert plan.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_mutation_a_rule_without_its_condition_is_caught_by_the_proof(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
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
    (tmp_path / "original.onnx").write_bytes(original.SerializeToString())
    (tmp_path / "freed.onnx").write_bytes(candidate.SerializeToString())
    with pytest.raises(NotProved, match="differs from per-sample runs"):
        prove(tmp_path / "original.onnx", tmp_path / "freed.onnx", 1, nchw_inputs)
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


def test_a_freed_segmenter_is_cut_and_explains_many_regions_per_image(tmp_path: Path) -> None:
    """The dynamo-style segmenter, freed, keeps the cut at its layer (head_inputs): a
    batch of three images with two classes each runs the trunk once, and each map is
    the class's Grad-CAM over the pixels it wins, from the source."""
    bundle = export_onnx(tmp_path, resize_model())
    info = read_bundle_info(bundle)
    assert info.batch_size == 0 and info.head_inputs
    batch, classes = images(3, seed=4), [[0, 1], [2, 3], [4, 0]]
    result = Explainer(bundle, device="cpu").explain(batch, classes, batch_size=3)
    logits, cams = region_gradcam(batch, classes)
    assert result.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(result.logits, logits[result.image_index], rtol=1e-4,
                               atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(result.raw, cams, rtol=1e-4, atol=1e-4 * cams.max())


@pytest.fixture(scope="module")
def fixed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fixed")
    return export_onnx(folder, reshape_model(mix=True), input_gradients=True)  # verified


def input_gradients_of_source(batch: np.ndarray, targets: list[int]) -> np.ndarray:
    """d y_target / d x of ``reshape_model(mix=True)`` at batch 1, NHWC, worked out by
    hand: the Dense row laid out as the map, masked by the ReLU, sent back through the
    padded Conv as its transpose."""
    (maps,) = per_image(reshape_model(mix=True), unit_nchw(batch), ["c"])
    grads = []
    for n, target in enumerate(targets):
        upstream = DENSE[target].reshape(CHANNELS, SIZE, SIZE) * (maps[n] > 0)
        padded = np.pad(upstream.astype(np.float64), ((0, 0), (2, 2), (2, 2)))
        grad = np.zeros((3, SIZE, SIZE))
        for ki in range(3):
            for kj in range(3):
                window = padded[:, 2 - ki + 1 : 2 - ki + 1 + SIZE, 2 - kj + 1 : 2 - kj + 1 + SIZE]
                grad += np.einsum("chw,cd->dhw", window, CONV[:, :, ki, kj])
        grads.append(grad.transpose(1, 2, 0))
    return np.array(grads)


def test_fixed_batch_export_is_verified_with_input_gradients(tmp_path: Path) -> None:
    """Verification runs on the kept-batch bundle: the logits, the layer's gradients,
    weights and cam, and the input gradients are all compared, and they are right."""
    source = tmp_path / "model.onnx"
    onnx.save(reshape_model(mix=True), source)
    result = onnxcam.export(source, tmp_path / "model.cam.onnx", layer="r",
                            input_gradients=True)
    assert result.info.batch_size == 1 and result.info.gradient == "analytic"
    assert result.report is not None and result.report.ok
    assert {"logits", OUTPUT_INPUT_GRADIENTS} <= set(result.report.errors)
    assert any(name.startswith(OUTPUT_CAM) for name in result.report.errors)
    assert max(result.report.errors.values()) < 1e-4
    batch, targets = images(3, seed=8), [2, 0, 4]
    session = cpu_session(str(result.path))
    (got,) = run_in_chunks(session.run, [OUTPUT_INPUT_GRADIENTS],
                           {INPUT_IMAGE: batch, INPUT_TARGET: np.array(targets, np.int64)}, 1)
    want = input_gradients_of_source(batch, targets)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("rule", ["Gemm", "Conv"])
def test_mutation_a_doubled_rule_is_refused_at_a_fixed_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: str,
) -> None:
    """A Gemm rule returning twice the gradient doubles the layer's gradients; a
    doubled Conv rule only the input gradients. Either is caught, nothing written."""
    from test_verify import doubled, replace_rule

    source = tmp_path / "model.onnx"
    onnx.save(reshape_model(mix=True), source)
    replace_rule(monkeypatch, rule, doubled)
    out = tmp_path / "model.cam.onnx"
    with pytest.raises(VerificationError, match="disagrees with its source"):
        onnxcam.export(source, out, layer="r", input_gradients=True)
    assert not out.exists()


def batch_two_mixing_model() -> onnx.ModelProto:
    """``reshape_model(mix=True)`` exported at batch 2: the Transpose puts the batch on
    axis 1, so each row of the Reshape holds half the channels of both samples."""
    model = reshape_model(mix=True)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    shape = next(t for t in model.graph.initializer if t.name == "shape")
    shape.CopyFrom(numpy_helper.from_array(np.array([2, -1], np.int64), "shape"))
    return model


def test_a_batch_mixing_model_at_batch_two_is_verified(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept at batch 2, its rows depend on both samples: verification runs each probe
    image in a batch of its own copies and differentiates what the bundle's backward
    pass does (every row's score), so a right bundle passes and a doubled rule not."""
    from test_verify import doubled, replace_rule

    source = tmp_path / "model.onnx"
    onnx.save(batch_two_mixing_model(), source)
    result = onnxcam.export(source, tmp_path / "model.cam.onnx", layer="r",
                            input_gradients=True)
    assert result.info.batch_size == 2
    assert result.report is not None and max(result.report.errors.values()) < 1e-4
    replace_rule(monkeypatch, "Gemm", doubled)
    with pytest.raises(VerificationError, match="disagrees with its source"):
        onnxcam.export(source, tmp_path / "mutant.cam.onnx", layer="r")


def test_fixed_batch_is_recorded_and_pinned(fixed_bundle: Path) -> None:
    assert read_bundle_info(fixed_bundle).batch_size == 1
    model = onnx.load(str(fixed_bundle))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxcam.batch_size"] == "1"
    image = next(i for i in model.graph.input if i.name == INPUT_IMAGE)
    assert image.type.tensor_type.shape.dim[0].dim_value == 1


def test_fixed_batch_bundle_matches_the_source(fixed_bundle: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="onnxcam.engine.sessions"):
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


# --------------------------------------------------------------------------- torch


def torch_cnn(flatten: str) -> Any:
    """A small CNN whose head flattens with ``x.view(1, -1)`` (bakes batch 1 in, as
    EfficientNet-Lite0's ``x.view(bs, -1)`` does) or ``x.flatten(1)``."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(6, 8, 3, padding=1, stride=2), torch.nn.ReLU())
            self.fc = torch.nn.Linear(8 * 8 * 8, CLASSES)

        def forward(self, x: Any) -> Any:
            x = self.features(x)
            x = x.view(1, -1) if flatten == "view" else x.flatten(1)
            return self.fc(x)

    torch.manual_seed(0)
    return Net().eval()


def export_with_torch(model: Any, exporter: str, path: Path) -> Path:
    import contextlib
    import io
    import warnings

    torch = pytest.importorskip("torch")
    example = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=exporter == "dynamo")
    return path


@pytest.mark.torch
@pytest.mark.parametrize("flatten", ["view", "flatten"])
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_batch_one_exports_explain_batches(tmp_path: Path, exporter: str,
                                                 flatten: str) -> None:
    """The plain call at batch 1, both exporters: freed, verified, and per image the
    numbers of torch itself and of pytorch-grad-cam."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    from zoo import normalise

    model = torch_cnn(flatten)
    source = export_with_torch(model, exporter, tmp_path / "model.onnx")
    out = tmp_path / "model.cam.onnx"
    onnxcam.export(source, out, preprocess="unit")  # verification on
    info = read_bundle_info(out)
    assert info.batch_size == 0
    batch, targets = images(5, seed=4).repeat(2, axis=1).repeat(2, axis=2), [0, 1, 2, 3, 4]
    result = Explainer(out, device="cpu").explain(batch, targets, batch_size=5)
    x = torch.from_numpy(unit_nchw(batch))
    with torch.no_grad():
        logits = np.concatenate([model(x[n : n + 1]).numpy() for n in range(5)])
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    reference = np.concatenate([grad_cam(model, x[n : n + 1], targets[n]) for n in range(5)])
    assert result.raw.shape == reference.shape
    assert float(np.abs(normalise(result.raw) - normalise(reference)).max()) < 2e-3


def grad_cam(model: Any, x: Any, target: int) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM at ``features`` (the last ReLU), before resizing."""
    import zoo

    return zoo.raw_grad_cam(model, model.features, x, [target])


# -> the bundle's batch. ViT's dynamo graph merges the batch with the tokens and the
# heads ([17, 12, 64] at batch 1), which the rule does not read: it keeps batch 1.
ZOO_CASES = {"resnet18": 0, "shufflenet_v2_x0_5": 0, "vit_b_16": 1}


# Wall time, not a tolerance: the ViT-B case took 303 s on two cores shared with other
# jobs (torch's dynamo export, float64 verification), past pytest's default of 300 s.
SLOW_CASES = {"vit_b_16": pytest.mark.timeout(900)}


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=SLOW_CASES.get(name, ()))
                                  for name in ZOO_CASES])
def test_zoo_plain_export_explains_a_batch_of_four(tmp_path: Path, name: str) -> None:
    """torchvision models exported by the plain default call at batch 1, explained
    four at a time, against pytorch-grad-cam at the usual layer."""
    pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    import zoo

    entry = zoo.ZOO[name]
    model = entry.model()
    source = zoo.export_torch(entry, model, "dynamo", tmp_path / "model.onnx")
    x = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    layer = zoo.onnx_layer_name(source, model, entry.layer, x)
    out = tmp_path / "model.cam.onnx"
    fixed = ZOO_CASES[name]
    onnxcam.export(source, out, layer=layer, preprocess=zoo.PREPROCESS)  # verified
    assert read_bundle_info(out).batch_size == fixed
    batch, targets = zoo.images(entry.size, 4, seed=5), (1, 8, 3, 0)
    ours = Explainer(out, device="cpu").explain(batch, list(targets), batch_size=4).raw
    reference = zoo.reference_maps(entry, model, batch, targets)
    assert zoo.map_error(ours, reference) < zoo.MAP_TOLERANCE


def test_run_in_chunks_feeds_exactly_the_fixed_batch_and_drops_the_padding() -> None:
    seen: list[int] = []

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        seen.append(len(feeds["a"]))
        return [feeds["a"] * 2 + feeds["b"][:, None]]

    a = np.arange(14, dtype=np.float32).reshape(7, 2)
    b = np.arange(7, dtype=np.float32) * 10
    (got,) = run_in_chunks(run, ["y"], {"a": a, "b": b}, 3)
    assert seen == [3, 3, 3]
    np.testing.assert_array_equal(got, a * 2 + b[:, None])


def test_fixed_batch_bundles_run_each_target(tmp_path: Path) -> None:
    """A model whose batch is baked in (1) is not cut: each (image, target) row runs
    the whole bundle in chunks of its batch, and gives the single-class maps."""
    path = tmp_path / "fixed.cam.onnx"
    onnxcam.export(reshape_model(mix=True), path, layer="r", head="sigmoid")
    ex = Explainer(path, device="cpu")
    assert ex.info.batch_size == 1 and ex.info.weighted and not ex.info.head_inputs
    x = np.random.default_rng(9).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    res = ex.explain(x, targets=[[0, 4], [Contrast(1, 2)]], method="hirescam")
    assert res.image_index.tolist() == [0, 0, 1]
    for row, cls in enumerate((0, 4)):
        single = ex.explain(x[:1], targets=cls, method="hirescam")
        np.testing.assert_allclose(res.raw[row], single.raw[0], rtol=1e-5, atol=1e-8)

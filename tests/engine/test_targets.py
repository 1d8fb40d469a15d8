"""Targets beyond one class: the bundle's ``target_weights`` seed, many targets per image
(the trunk run once, the part after the layer once per target), ``all-positive``,
``top:k`` and contrasts, held against hand-worked gradients and single-class runs."""

from __future__ import annotations

from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcam.bundle import SEED, read_bundle
from onnxcam.engine import Explainer
from onnxcam.engine.targets import Contrast, Region, Weighting
from onnxcam.errors import BadTargetError
from onnxcam.exporter import export
from onnxcam.exporter.passes.cut_at_layers import cut_error, cut_problem

CLASSES = 14
CAM_METHODS = ("gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "eigencam")


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    """``onnx_multilabel`` (GAP -> Gemm -> 14 scores, sigmoid outside) with a sigmoid head."""
    source = models.onnx_multilabel(classes=CLASSES, squash=False)
    out = tmp_path_factory.mktemp("targets") / "multilabel.cam.onnx"
    export(source, out, head="sigmoid")
    return out, source


@pytest.fixture(scope="module")
def skip_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "skip.cam.onnx"
    export(models.onnx_skip_head(), out, layer="last_relu", head="sigmoid")
    return out


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def test_target_weights_seed_the_gradient_by_hand(multilabel: tuple[Path, onnx.ModelProto]
                                                   ) -> None:
    """The head is GAP, Gemm: d sum(w * logits) / d feat is W^T w / (h * w) at every
    pixel, worked out from the source model's own weights."""
    path, source = multilabel
    weight = next(numpy_helper.to_array(t) for t in source.graph.initializer
                  if t.name == "fc.weight").astype(np.float64)  # [K, C]
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, CLASSES)).astype(np.float32)
    got = run(path, {"image": images(3), "target": np.zeros(3, np.int64), "target_weights": w})
    pixels = got["activations"].shape[2] * got["activations"].shape[3]
    want = (w.astype(np.float64) @ weight) / pixels  # [N, C]
    np.testing.assert_allclose(got["gradients"], np.broadcast_to(
        want[:, :, None, None], got["gradients"].shape), rtol=1e-5, atol=1e-9)


def test_without_target_weights_the_class_is_seeded(multilabel: tuple[Path, onnx.ModelProto]
                                                     ) -> None:
    """Feeds without ``target_weights`` (plain onnxruntime users, older callers) get the
    class's one-hot seed, and -1 the top class."""
    path, _ = multilabel
    x = images(4)
    plain = run(path, {"image": x, "target": np.array([2, -1, 0, 13])})
    top = plain["logits"][1].argmax()
    onehot = np.zeros((4, CLASSES), np.float32)
    onehot[[0, 1, 2, 3], [2, top, 0, 13]] = 1
    weighted = run(path, {"image": x, "target": np.zeros(4, np.int64), "target_weights": onehot})
    for name in ("gradients", "weights", "cam"):
        np.testing.assert_array_equal(plain[name], weighted[name])


def test_the_cut_is_recorded_and_checked(skip_head: Path) -> None:
    """The head reads ``skip_conv`` (made before the layer) and a batch size read from
    ``pool1``'s shape: the skip is handed over per row, and the shape's producers join
    the head, so ``pool1`` is handed over per row too, and no shape is."""
    info = read_bundle(skip_head).info
    by_name = {h.name: h for h in info.head_inputs}
    assert set(by_name) == {"feat", "skip_conv", "pool1", SEED}
    assert all(h.batched and h.elem_type == onnx.TensorProto.FLOAT for h in by_name.values())


@pytest.mark.parametrize("method", CAM_METHODS)
def test_many_targets_match_single_calls(skip_head: Path, method: str) -> None:
    """Every row of one call with several targets per image equals the single-class
    call for that image and class (the trunk run once against the whole bundle run
    per row), and the rows come in image order, then target order."""
    ex = Explainer(skip_head, device="cpu")
    x = images(3, seed=2)
    asked = [[0, 3], [5], [1, 2, 4]]
    res = ex.explain(x, targets=asked, method=method)
    assert res.image_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert res.targets.tolist() == [0, 3, 5, 1, 2, 4]
    for row, (image, cls) in enumerate(zip(res.image_index, res.targets)):
        single = ex.explain(x[image : image + 1], targets=int(cls), method=method)
        np.testing.assert_allclose(res.raw[row], single.raw[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.logits[row], single.logits[0], rtol=1e-5, atol=1e-6)


def test_all_positive_and_top_k_pick_from_the_scores(skip_head: Path) -> None:
    """``all-positive`` gives each image its classes of sigmoid probability over the
    threshold, best first (none for an image with none); ``top:k`` its k best."""
    ex = Explainer(skip_head, device="cpu")
    x = images(4, seed=3)
    logits = ex.explain(x).logits
    probability = 1 / (1 + np.exp(-logits.astype(np.float64)))
    threshold = float(np.sort(probability[1])[-2])  # image 1 keeps one class
    threshold = max(threshold, float(probability[0].max()))  # image 0 keeps none
    res = ex.explain(x, targets="all-positive", threshold=threshold)
    want = [(i, int(c)) for i in range(4) for c in np.argsort(-logits[i])
            if probability[i, c] > threshold]
    assert list(zip(res.image_index.tolist(), res.targets.tolist())) == want
    assert 0 not in res.image_index
    top = ex.explain(x, targets="top:3")
    assert top.targets.tolist() == np.argsort(-logits, axis=1)[:, :3].ravel().tolist()
    assert top.target_names == [str(c) for c in top.targets]


def test_no_image_with_a_target(skip_head: Path) -> None:
    res = Explainer(skip_head, device="cpu").explain(images(2), targets="all-positive",
                                                       threshold=1.0)
    assert res.heatmaps.shape == (0, 16, 16) and res.image_index.tolist() == []


def test_contrast_is_the_difference_of_the_classes(skip_head: Path) -> None:
    """Contrast(a, b)'s gradients are a's minus b's (the bundle's outputs, to rounding)."""
    x = images(2, seed=4)
    contrast = np.zeros((2, 6), np.float32)
    contrast[:, 1], contrast[:, 4] = 1, -1
    both = run(skip_head, {"image": x, "target": np.zeros(2, np.int64),
                           "target_weights": contrast})
    a = run(skip_head, {"image": x, "target": np.full(2, 1)})
    b = run(skip_head, {"image": x, "target": np.full(2, 4)})
    np.testing.assert_allclose(both["gradients"], a["gradients"] - b["gradients"], atol=1e-7)
    res = Explainer(skip_head, device="cpu").explain(x, targets=Contrast(1, 4),
                                                       method="hirescam")
    assert res.target_names == ["1-vs-4", "1-vs-4"] and res.targets.tolist() == [1, 1]
    grads = both["gradients"]
    want = np.maximum((grads * both["activations"]).sum(axis=1), 0)
    np.testing.assert_allclose(res.raw, want, rtol=1e-5, atol=1e-8)


def test_a_weighting_of_the_logits(skip_head: Path) -> None:
    x = images(1, seed=5)
    weights = np.linspace(-1, 1, 6).astype(np.float32)
    res = Explainer(skip_head, device="cpu").explain(x, targets=[[Weighting(weights, "ramp"),
                                                                  2]], method="layercam")
    got = run(skip_head, {"image": x, "target": np.zeros(1, np.int64),
                          "target_weights": weights[None]})
    want = np.maximum((np.maximum(got["gradients"], 0) * got["activations"]).sum(axis=1), 0)
    assert res.target_names == ["ramp", "2"] and res.targets.tolist() == [-1, 2]
    np.testing.assert_allclose(res.raw[0], want[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["scorecam", "saliency", "smoothgrad"])
def test_methods_that_rerun_the_model_take_many_targets(tmp_path: Path, method: str) -> None:
    """Score-CAM and the input-gradient methods run each image once per target; SmoothGrad
    draws its noise per image, so a row matches that image's one-target call."""
    path = tmp_path / "grads.cam.onnx"
    export(models.onnx_skip_head(), path, layer="last_relu", head="sigmoid",
           input_gradients=True)
    ex = Explainer(path, device="cpu")
    x = images(2, seed=6)
    options = {"samples": 3} if method == "smoothgrad" else {}
    res = ex.explain(x, targets=[[0, 5], [Contrast(2, 3)]], method=method, **options)
    assert res.image_index.tolist() == [0, 0, 1]
    for row, (image, cls) in enumerate([(0, 0), (0, 5)]):
        single = ex.explain(x[image : image + 1], targets=cls, method=method, **options)
        np.testing.assert_allclose(res.raw[row], single.raw[0], rtol=1e-5, atol=1e-8)
    one_each = ex.explain(x, targets=[5, Contrast(2, 3)], method=method, **options)
    np.testing.assert_allclose(res.raw[1:], one_each.raw, rtol=1e-5, atol=1e-8)
    if method == "saliency":
        a = ex.explain(x[1:], targets=2, method=method).input_gradients
        b = ex.explain(x[1:], targets=3, method=method).input_gradients
        np.testing.assert_allclose(res.input_gradients[2], (a - b)[0], rtol=1e-4, atol=1e-7)


def test_fd_bundles_take_classes_only(tmp_path: Path) -> None:
    path = tmp_path / "fd.cam.onnx"
    export(models.onnx_multilabel(classes=CLASSES, squash=False), path, head="sigmoid",
           gradient="fd")
    ex = Explainer(path, device="cpu")
    assert not ex.info.weighted and not ex.info.head_inputs
    res = ex.explain(images(2), targets=[[1, 2], [3]])
    single = ex.explain(images(2)[:1], targets=2)
    assert res.targets.tolist() == [1, 2, 3]
    np.testing.assert_allclose(res.raw[1], single.raw[0], rtol=1e-5, atol=1e-8)
    with pytest.raises(BadTargetError, match="single classes only"):
        ex.explain(images(1), targets=Contrast(1, 2))


@pytest.mark.parametrize("targets, message", [
    ("top:0", "k must be 1 to 14"),
    ("top:15", "k must be 1 to 14"),
    ("top:x", "no class labelled"),
    (Contrast(3, 3), "two different classes"),
    (Region(1), "segmentation bundles"),
    ([[1], [2]], "one per image"),
    ([1.5], "not a target"),
    (Weighting(np.ones(3)), "shape"),
    (Weighting(np.array([np.nan] * 14)), "finite"),
])
def test_bad_targets_are_refused(multilabel: tuple[Path, onnx.ModelProto], targets: object,
                                 message: str) -> None:
    with pytest.raises(BadTargetError, match=message):
        Explainer(multilabel[0], device="cpu").explain(images(1), targets=targets)


def test_the_cut_check_catches_a_broken_cut(skip_head: Path) -> None:
    """Mutation: a skip tensor handed over whole instead of per row (its ``batched``
    flag lost) gives other gradients, and the export-time check says so."""
    bundle = read_bundle(skip_head)
    model = onnx.load_from_string(bundle.data)
    draft = type("DraftLike", (), {"height": 16, "width": 16, "channels": 3, "shapes": {
        next(n.input[0] for n in model.graph.node if n.output[0] == "logits"):
        type("Shape", (), {"dims": (1, 6)})()}})()
    assert cut_error(model, bundle.info.head_inputs, draft) < 1e-5
    broken = tuple(h if h.name != "skip_conv" else type(h)(h.name, False, h.elem_type)
                   for h in bundle.info.head_inputs)
    assert "Attempting to broadcast" in cut_problem(model, broken, draft)
    pool1_whole = tuple(h if h.name != "pool1" else type(h)(h.name, False, h.elem_type)
                        for h in bundle.info.head_inputs)
    assert cut_problem(model, pool1_whole, draft)


def older_bundle(path: Path, out: Path) -> Path:
    """``path`` as onnxcam wrote bundles before ``target_weights``: the seed is the
    one-hot rows themselves, and the metadata records no cut."""
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        if node.op_type == "Concat" and "target_weights" in node.input:
            rows = [name for name in node.input if name != "target_weights"]
            node.op_type, node.input[:] = "Identity", rows
            del node.attribute[:]
    for field in (graph.input, graph.initializer):
        for item in [each for each in field if each.name == "target_weights"]:
            field.remove(item)
    for prop in [p for p in model.metadata_props if p.key == "onnxcam.head_inputs"]:
        model.metadata_props.remove(prop)
    onnx.save(model, str(out))
    return out


def test_older_bundles_explain_many_classes(skip_head: Path, tmp_path: Path) -> None:
    """A bundle without ``target_weights`` runs each image once per class, and refuses
    targets other than classes with a clear error."""
    old = Explainer(older_bundle(skip_head, tmp_path / "old.cam.onnx"), device="cpu")
    assert not old.info.weighted and not old.info.head_inputs
    new = Explainer(skip_head, device="cpu")
    x = images(2, seed=8)
    got = old.explain(x, targets=[[0, 3], "top:2"], method="xgradcam")
    want = new.explain(x, targets=[[0, 3], "top:2"], method="xgradcam")
    assert got.targets.tolist() == want.targets.tolist()
    np.testing.assert_allclose(got.raw, want.raw, rtol=1e-5, atol=1e-8)
    with pytest.raises(BadTargetError, match="re-export"):
        old.explain(x, targets=Contrast(0, 1))



# -- segmenters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    source = models.onnx_segmenter()
    out = tmp_path_factory.mktemp("targets") / "segmenter.cam.onnx"
    export(source, out, layer="last_relu")
    return out, source


def hand_region_gradients(source: onnx.ModelProto, cls: int, mask: np.ndarray) -> np.ndarray:
    """d sum(mask * scores[cls]) / d feat for a 1x1 Conv and a nearest 2x upsampling:
    the class's 1x1 weights times the mask summed over each 2x2 block, [C, h, w]."""
    weight = next(numpy_helper.to_array(t) for t in source.graph.initializer
                  if t.name == "classes.weight")[cls, :, 0, 0].astype(np.float64)
    h, w = mask.shape[0] // 2, mask.shape[1] // 2
    blocks = mask.reshape(h, 2, w, 2).sum(axis=(1, 3))
    return weight[:, None, None] * blocks[None]


def test_regions_of_a_segmenter_by_hand(segmenter: tuple[Path, onnx.ModelProto]) -> None:
    """Region(c): class c summed over the pixels the model gives it, or over a mask given
    at the image's size; a class number means Region(c); rows ranked by pixel share."""
    path, source = segmenter
    ex = Explainer(path, device="cpu")
    assert ex.info.output == "pixels" and ex.info.head_inputs
    x = images(2, seed=11)
    mask = np.zeros((32, 32), bool)
    mask[4:20, 8:30] = True  # at twice the output's size: resized by nearest pixel
    res = ex.explain(x, targets=[[0, Region(1, mask)], "top:2"], method="hirescam")
    logits = res.logits
    assert res.image_index.tolist() == [0, 0, 1, 1]
    winners = logits[2].argmax(axis=0)
    share = np.bincount(winners.ravel(), minlength=3)
    assert res.targets.tolist()[2:] == np.argsort(-share, kind="stable")[:2].tolist()
    outputs = run(path, {"image": x, "target": np.zeros(2, np.int64)})
    small = mask[::2, ::2]
    for row, (image, cls, region) in enumerate([
            (0, 0, logits[0].argmax(axis=0) == 0), (0, 1, small),
            (1, res.targets[2], winners == res.targets[2])]):
        grads = hand_region_gradients(source, int(cls), region.astype(np.float64))
        want = np.maximum((grads * outputs["activations"][image]).sum(axis=0), 0)
        np.testing.assert_allclose(res.raw[row], want, rtol=1e-4, atol=1e-6)
    assert res.top(1)[0][0]["score"] == pytest.approx(
        float(np.mean(logits[0].argmax(axis=0) == res.top(1)[0][0]["class"])))


def test_every_image_keeps_its_scores(skip_head: Path) -> None:
    """An image all-positive finds nothing for has no row, but its logits and top
    classes stay in ``image_logits`` and ``image_top``, on every path."""
    ex = Explainer(skip_head, device="cpu")
    x = images(3, seed=12)
    plain = ex.explain(x)
    for method in ("gradcam", "scorecam"):
        res = ex.explain(x, targets="all-positive", threshold=0.6, method=method)
        np.testing.assert_allclose(res.image_logits, plain.logits, rtol=1e-5, atol=1e-6)
        assert [t[0]["class"] for t in res.image_top(1)] == plain.targets.tolist()
    none = ex.explain(x, targets="all-positive", threshold=1.0)
    assert len(none.targets) == 0 and none.image_logits.shape == (3, 6)

"""torchvision's detectors from the file their users export (``torch.onnx.export(model,
([image],), path, dynamo=False)``): every detection's Grad-CAM through the public
``Explainer`` against pytorch-grad-cam's ``GradCAM`` with ``FasterRCNNBoxScoreTarget``
on the same layer (issue 22, item 6).

pytorch-grad-cam's target sums the scores of the detections whose box best overlaps
the one it is given, of the same label; it is the detection's own score only when no
other detection has that very box (SSD's classes of one anchor share one), so the
detections compared are those with a box of their own, and the reference runs one
image at a time on the torch model's own boxes. The models are calibrated as
``tests/torchvision_detectors.py`` says.

The reference torch model starts from the tensor the exported graph feeds its first
convolution (``graph_fed``): the legacy export's resizing and normalising differ from
torch's own by about 1e-5, and a detector's score gradient can magnify that (one Faster
R-CNN detection of the test image: 1.8e-2 from torch fed its own resizing, 1.6e-5 fed
the graph's). ``test_the_graph_feeds_the_backbone_what_torch_does`` bounds that gap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torchvision_detectors as tv
from cam_references import assert_normalised_maps_match
from click.testing import CliRunner
from PIL import Image

from onnxcam import Explainer, export
from onnxcam.bundle import OUTPUT_DETECTIONS
from onnxcam.cli import main
from onnxcam.engine.explainer import Explanation
from onnxcam.errors import BadImageError

pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MAP_TOLERANCE = 2e-3
COMPARED = 5  # detections per model held against pytorch-grad-cam
FED_TOLERANCE = 3e-5  # the graph's first convolution's input from torch's own
CANCELLING = 100.0  # the most a compared map's channel terms may exceed the map


@dataclass
class Case:
    detector: tv.Detector
    bundle: Path
    explanation: Explanation  # every detection of the test image
    reference: dict[str, Any]  # the torch model's own detections of it


def make_case(name: str, folder: Path) -> Case:
    import torch

    detector = tv.build(name, folder)
    bundle = folder / f"{name}.cam.onnx"
    export(detector.path, bundle)  # its size is the image it was exported on
    explanation = Explainer(bundle, device="cpu").explain(detector.image[None])
    with torch.no_grad(), graph_fed(detector, detector.image):
        (reference,) = detector.model([tv.as_tensor(detector.image)])
    return Case(detector, bundle, explanation, reference)


def first_convolution(detector: tv.Detector) -> tuple[Any, str]:
    """The torch model's first convolution and the name of its input in the export."""
    import onnx
    import torch

    module = next(m for m in detector.model.modules() if isinstance(m, torch.nn.Conv2d))
    graph = onnx.load(str(detector.path))
    return module, next(n.input[0] for n in graph.graph.node if n.op_type == "Conv")


def graph_input(detector: tv.Detector, image: np.ndarray) -> np.ndarray:
    """What the exported graph feeds its first convolution for ``image``."""
    import onnx
    import onnxruntime as ort

    _, name = first_convolution(detector)
    graph = onnx.load(str(detector.path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    session = ort.InferenceSession(graph.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (fed,) = session.run([name], {session.get_inputs()[0].name: tv.as_tensor(image).numpy()})
    return np.asarray(fed)


@contextmanager
def graph_fed(detector: tv.Detector, image: np.ndarray) -> Iterator[None]:
    """The torch model, while open, fed at its first convolution what the exported
    graph feeds it for ``image`` (whatever image the model is given)."""
    import torch

    module, _ = first_convolution(detector)
    fed = torch.from_numpy(graph_input(detector, image))
    hook = module.register_forward_pre_hook(lambda _m, _inputs: (fed.clone(),))
    try:
        yield
    finally:
        hook.remove()


FASTER_RCNN = "fasterrcnn_mobilenet_v3_large_320_fpn"
EXPLAINED = list(tv.FAMILIES)
OTHER_IMAGE = tv.test_image(FASTER_RCNN, seed=2)


@pytest.fixture(scope="module", params=EXPLAINED)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(request.param, tmp_path_factory.mktemp(request.param))


def own_boxes(boxes: np.ndarray) -> list[int]:
    """The detections whose box no other detection shares."""
    return [i for i in range(len(boxes)) if (np.abs(boxes - boxes[i]).sum(1) == 0).sum() == 1]


def pgc_raw(detector: tv.Detector, label: int, box: np.ndarray,
            image: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """pytorch-grad-cam's Grad-CAM for one detection (on ``image``, the detector's
    own by default): the cam after its ReLU, before its resizing, at the default
    layer; and how much it cancels (``CANCELLING``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    class Raw(GradCAM):  # type: ignore[misc]
        raw: np.ndarray
        terms: np.ndarray

        def get_cam_image(self, input_tensor: Any, target_layer: Any, targets: Any,
                          activations: np.ndarray, grads: np.ndarray,
                          *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(input_tensor, target_layer, targets, activations,
                                        grads, *args, **kwargs)
            self.raw = np.maximum(cam, 0)
            self.terms = np.abs(grads.mean(axis=(2, 3), keepdims=True) * activations).sum(1)
            return cam

    model = detector.model
    image = detector.image if image is None else image
    with Raw(model=model, target_layers=[model.get_submodule(detector.layer)]) as cam, \
            graph_fed(detector, image):
        cam(tv.as_tensor(image)[None], targets=[FasterRCNNBoxScoreTarget([label], [box])])
        top = float(cam.raw.max())
        return cam.raw[0].astype(np.float64), float(cam.terms.max()) / top if top else 0.0


def compared_maps(detector: tv.Detector, reference: dict[str, Any],
                  image: np.ndarray | None = None) -> tuple[list[int], list[np.ndarray]]:
    """The detections held against pytorch-grad-cam (see ``test_each_detection...``):
    rows and their reference maps."""
    boxes = reference["boxes"].numpy()
    labels = reference["labels"].tolist()
    rows, want = [], []
    wanted = 2 * COMPARED if hasattr(detector.model, "rpn") else COMPARED
    for row in own_boxes(boxes)[:4 * COMPARED]:
        raw, cancelling = pgc_raw(detector, labels[row], boxes[row], image)
        # A map a hundred times smaller than the channel terms it sums is float32
        # rounding in the reference (FCOS's best detection: its float32 map 0.3 from
        # the float64 one, which the bundle's is within 1e-5 of): not compared.
        if cancelling > CANCELLING:
            continue
        rows.append(row)
        want.append(raw)
        # Random weights leave some detections' maps flat (their anchors lie on maps
        # before the layer, or behind saturated ReLU6s): go on to COMPARED that are not.
        if sum(each.max() > 0 for each in want) == wanted:
            break
    assert rows, "every box is shared"
    return rows, want


def test_detections_are_the_models_own(case: Case) -> None:
    got, want = case.explanation, case.reference
    assert got.info.output == OUTPUT_DETECTIONS and got.info.batch_size == 1
    assert len(got.detections) == len(want["scores"]) > 0
    np.testing.assert_allclose([d.score for d in got.detections], want["scores"].numpy(),
                               atol=1e-4)
    assert [d.cls for d in got.detections] == want["labels"].tolist()
    np.testing.assert_allclose([d.box for d in got.detections], want["boxes"].numpy(),
                               atol=2e-2)
    assert [d.rank for d in got.detections] == list(range(len(got.detections)))
    # A row's logits are its source entry's classes, the detection's score among them.
    rows = np.arange(len(got.detections))
    np.testing.assert_array_equal(got.logits[rows, got.targets], [d.score for d in
                                                                   got.detections])


def test_each_detection_matches_pytorch_grad_cam(case: Case) -> None:
    rows, want = compared_maps(case.detector, case.reference)
    assert_normalised_maps_match(case.explanation.raw[rows], np.stack(want), MAP_TOLERANCE,
                                 case.detector.name)


class Counted:
    """A session whose runs are counted."""

    def __init__(self, session: Any) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: Any) -> Any:
        self.runs += 1
        return self.session.run(*args)


def test_an_image_runs_forward_once_and_backward_per_detection(case: Case) -> None:
    """The bundle cut at its seed: the forward pass once for the image, then the
    backward pass alone once per detection, giving the maps held against
    pytorch-grad-cam above."""
    explainer = Explainer(case.bundle, device="cpu")
    cut = explainer.sessions.at_seed()
    assert cut is not None
    counted = replace(cut, forward=Counted(cut.forward), backward=Counted(cut.backward))
    explainer.sessions.at_seed = lambda: counted  # type: ignore[method-assign]
    got = explainer.explain(case.detector.image[None])
    assert (counted.forward.runs, counted.backward.runs) == (1, len(got.detections))
    np.testing.assert_array_equal(got.raw, case.explanation.raw)


def test_the_graph_feeds_the_backbone_what_torch_does(case: Case) -> None:
    """The reference's one liberty (``graph_fed``): the legacy export's resizing and
    normalising give the first convolution torch's own input within rounding."""
    import torch

    module, _ = first_convolution(case.detector)
    seen: list[np.ndarray] = []
    hook = module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].numpy()))
    try:
        with torch.no_grad():
            case.detector.model([tv.as_tensor(case.detector.image)])
    finally:
        hook.remove()
    fed = graph_input(case.detector, case.detector.image)
    assert seen[0].shape == fed.shape
    assert np.abs(seen[0] - fed).max() <= FED_TOLERANCE


def test_faster_rcnn_explains_an_image_with_another_count_of_proposals(case: Case) -> None:
    """Its scores come one row per proposal, as many as its RPN keeps for the image:
    the bundle, exported on one image, explains another with a different count."""
    import torch

    if case.detector.name != FASTER_RCNN:
        pytest.skip("the other detectors score a fixed set of anchors")
    model = case.detector.model
    counts = []
    for image in (case.detector.image, OTHER_IMAGE):
        with torch.no_grad():
            batch, _ = model.transform([tv.as_tensor(image)])
            proposals, _ = model.rpn(batch, model.backbone(batch.tensors))
        counts.append(len(proposals[0]))
    assert counts[0] != counts[1], counts
    with torch.no_grad(), graph_fed(case.detector, OTHER_IMAGE):
        (reference,) = model([tv.as_tensor(OTHER_IMAGE)])
    found = Explainer(case.bundle, device="cpu").explain(OTHER_IMAGE[None])
    assert found.logits.shape[0] == len(found.detections) == len(reference["scores"]) > 0
    assert [d.cls for d in found.detections] == reference["labels"].tolist()
    rows, want = compared_maps(case.detector, reference, OTHER_IMAGE)
    assert_normalised_maps_match(found.raw[rows], np.stack(want), MAP_TOLERANCE,
                                 f"{FASTER_RCNN}, a second image")
    # Both images in one call: the same rows; every image's logits as wide as the
    # widest, the narrower padded with NaN.
    both = Explainer(case.bundle, device="cpu").explain(np.stack([case.detector.image,
                                                                  OTHER_IMAGE]))
    first = case.explanation
    np.testing.assert_array_equal(both.raw, np.concatenate([first.raw, found.raw]))
    assert [d.name for d in both.detections] == [d.name for d in (*first.detections,
                                                                  *found.detections)]
    alone = (first.image_logits, found.image_logits)
    widths = [logits.shape[-1] for logits in alone]
    assert widths[0] != widths[1]
    assert both.image_logits.shape == (2, first.image_logits.shape[1], max(widths))
    for image, (logits, width) in enumerate(zip(alone, widths)):
        np.testing.assert_array_equal(both.image_logits[image, :, :width], logits[0])
        assert np.isnan(both.image_logits[image, :, width:]).all()


def test_an_image_without_proposals_fails_alone_and_clearly(case: Case, tmp_path: Path
                                                            ) -> None:
    """torchvision's legacy export of Faster R-CNN cannot run where its RPN keeps no
    proposal (a Reshape to [0, -1]): that image gets a ``BadImageError`` saying so,
    and the next image is explained. The RPN's objectness bias, lowered by 60 in the
    bundle, makes every image such a one."""
    import onnx
    from onnx import numpy_helper

    if case.detector.name != FASTER_RCNN:
        pytest.skip("only a two-stage detector has proposals")
    model = onnx.load(str(case.bundle))
    (bias,) = [t for t in model.graph.initializer if t.name == "rpn.head.cls_logits.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) - 60, bias.name))
    blind = tmp_path / "blind.cam.onnx"
    onnx.save(model, str(blind))
    with pytest.raises(BadImageError, match="no proposal"):
        Explainer(blind, device="cpu").explain(case.detector.image[None])
    found = Explainer(case.bundle, device="cpu").explain(case.detector.image[None])
    assert len(found.detections) == len(case.explanation.detections)


def test_cli_writes_a_map_and_record_per_detection(case: Case, tmp_path: Path) -> None:
    if case.detector.name != EXPLAINED[0]:
        pytest.skip("the CLI is the same for every family: SSDlite's, the quickest")
    bundle = tmp_path / "cli.cam.onnx"
    result = CliRunner().invoke(main, ["export", str(case.detector.path), "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    image = tmp_path / "a.png"
    Image.fromarray(case.detector.image).save(image)
    result = CliRunner().invoke(main, ["explain", str(bundle), str(image), "--out",
                                       str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    want = case.explanation.detections
    assert [(r["rank"], r["label"], r["class"]) for r in records] == \
        [(d.rank, d.label, d.cls) for d in want]
    for record, found in zip(records, want):
        stem = tmp_path / "out" / f"a.{found.rank}.{found.label}"
        assert record["files"] == [f"{stem}.npy", f"{stem}.png"]
        np.testing.assert_allclose(record["box"], found.box, atol=0.01)  # JSON: 2 decimals
        assert Image.open(f"{stem}.png").size == case.detector.image.shape[1::-1]


def test_an_image_without_detections_gives_no_rows(case: Case) -> None:
    if case.detector.name != EXPLAINED[0]:
        pytest.skip("a blank image: calibrated SSDlite finds nothing on it, the others do")
    import torch

    blank = np.zeros((1, *case.detector.image.shape), np.uint8)
    with torch.no_grad():
        (reference,) = case.detector.model([tv.as_tensor(blank[0])])
    found = Explainer(case.bundle, device="cpu").explain(blank)
    assert len(found.detections) == len(reference["scores"]) == 0
    assert found.raw.shape[0] == 0 and found.image_logits.shape[0] == 1

"""Prototype for issue 22: one torchvision detection's Grad-CAM from the ONNX file its
users export, against pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``.

Each final score is the pre-suppression score tensor picked by Split, Gather,
GatherND, TopK, Concat and the NMS keep list. ``trace_sources`` runs that same
picking on the positions of the tensor (``onnxcam.exporter.detection_sources``), so
the graph says which (anchor, class) entry every detection came from; the gradient
is then seeded one-hot there and run back to the layer by the VJP rules. The bundle
around it is not library code yet.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcam.exporter.detection_sources import DETECTION_SOURCE, trace_sources
from onnxcam.exporter.passes.add_gradients import backpropagate
from onnxcam.exporter.shapes import run_with_outputs
from onnxcam.exporter.vjp.context import TensorShape, VjpContext
from onnxcam.graph import GraphBuilder, head_nodes, initializer_values, on_path
from onnxcam.runtime import cpu_session

torch = pytest.importorskip("torch")
detection = pytest.importorskip("torchvision.models.detection")
grad_cam = pytest.importorskip("pytorch_grad_cam")

log = logging.getLogger(__name__)

def score_gradient(model: onnx.ModelProto, layer: str, scores: str, position: int,
                   feeds: dict[str, np.ndarray]) -> np.ndarray:
    """d scores.flat[position] / d layer, by the VJP rules on a copy of ``model``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes = head_nodes(graph, layer, scores)
    names = {n for node in nodes for n in [*node.input, *node.output] if n} | {layer, scores}
    constants = initializer_values(graph)
    values = run_with_outputs(model, [n for n in names if n not in constants], feeds)
    # One image, no batch axis: every shape is static.
    values.update((n, constants[n]) for n in names if n in constants)
    shapes = {k: TensorShape(tuple(v.shape), (False,) * v.ndim) for k, v in values.items()}
    b = GraphBuilder(graph, "onnxcam/grad")
    ctx = VjpContext(b, shapes, constants, 17, on_path(graph, [layer], scores))
    seed = np.zeros(values[scores].size, np.float32)
    seed[position] = 1.0
    seed_name = b.const(seed.reshape(values[scores].shape), "seed")
    (gradient,) = backpropagate(ctx, nodes, scores, seed_name, [layer])
    b.nodes.append(helper.make_node("Identity", [gradient], ["layer_gradient"]))
    b.commit()
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("layer_gradient", 1, None))
    return cpu_session(model.SerializeToString()).run(None, feeds)[0]


def calibrated_ssdlite() -> torch.nn.Module:
    """Random weights, every tensor perturbed apart, BatchNorm statistics from
    smooth images (else activations vanish with depth). SSDlite's score threshold
    (0.001) then lets a few hundred near-uniform softmax scores through."""
    torch.manual_seed(0)
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * (p.std() if p.numel() > 1 else 1.0) + 0.01)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model.train()
        images = smooth_images(4, 320, 320)
        features = list(model.backbone(images).values())
        model.head(features)
    return model.eval()


def smooth_images(count: int, height: int, width: int) -> torch.Tensor:
    low = torch.rand(count, 3, height // 16, width // 16)
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")


def layer_tensor(graph: onnx.GraphProto, scope: str) -> str:
    """The output of the last node that torch's TorchScript exporter named inside
    ``scope`` (``/backbone/features.1/``): a module's output when it ends in one node."""
    inside = [n for n in graph.node if n.name.startswith(scope)]
    return inside[-1].output[0]


def grad_cam_of(activations: np.ndarray, gradients: np.ndarray, size: tuple[int, int]
                ) -> np.ndarray:
    """Grad-CAM, normalised and resized as pytorch-grad-cam does (its own helper)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    weights = gradients.mean(axis=(2, 3), keepdims=True)
    cam = np.maximum((weights * activations).sum(axis=1), 0)
    return scale_cam_image(scale_cam_image(cam, size)[:, None].max(axis=1), size)


@pytest.mark.slow
def test_ssdlite_detection_grad_cam_matches_pytorch_grad_cam(tmp_path) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    model = calibrated_ssdlite()
    image = smooth_images(1, 240, 320)[0]
    path = tmp_path / "ssdlite.onnx"
    torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=17)
    onnx_model = onnx.load(str(path))
    graph = onnx_model.graph
    boxes_out, scores_out, labels_out = (o.name for o in graph.output)
    layer = layer_tensor(graph, "/backbone/features.1/")
    stops, sources = trace_sources(graph, scores_out), DETECTION_SOURCE
    (score_tensor,) = stops
    feeds = {graph.input[0].name: image.numpy()}
    got = run_with_outputs(onnx_model, [boxes_out, scores_out, labels_out, sources,
                                        score_tensor, layer], feeds)
    # The traced positions hold exactly the final scores.
    np.testing.assert_array_equal(got[score_tensor].reshape(-1)[got[sources]], got[scores_out])

    with torch.no_grad():
        (reference,) = model([image])
    # A detection from an anchor on the layer's own map (anchors 2400 to 2999: the
    # first map, 20 x 20 x 6 anchors, comes before the layer; with random weights the
    # extra blocks' small maps may pass no gradient back, ReLU6 saturated).
    anchors = got[sources] // got[score_tensor].shape[-1]
    on_layer = np.flatnonzero((anchors >= 2400) & (anchors < 3000))
    pick = unique_detection(reference["boxes"].numpy(), on_layer)
    box, label = reference["boxes"][pick], int(reference["labels"][pick])
    match = int(np.argmin(np.abs(got[boxes_out] - box.numpy()).sum(1)))
    assert int(got[labels_out][match]) == label and match in on_layer
    gradient = score_gradient(onnx_model, layer, score_tensor, int(got[sources][match]), feeds)

    cam = GradCAM(model=model, target_layers=[model.backbone.features[-1]])
    want = cam(image[None], targets=[FasterRCNNBoxScoreTarget([label], [box.numpy()])])
    want_gradient = cam.activations_and_grads.gradients[0].numpy()
    mine = grad_cam_of(got[layer], gradient, (image.shape[2], image.shape[1]))
    gradient_error = np.abs(gradient - want_gradient).max() / np.abs(want_gradient).max()
    cam_error = float(np.abs(mine - want).max())
    log.info("detections %d, gradient rel. error %.2e, cam max error %.2e",
             len(got[scores_out]), gradient_error, cam_error)
    assert gradient_error < 1e-3 and cam_error < 2e-3


def unique_detection(boxes: np.ndarray, among: np.ndarray) -> int:
    """One of ``among`` whose box no other detection shares: pytorch-grad-cam's
    target takes the first detection of highest IoU, which must be this one."""
    for index in among:
        if (np.abs(boxes - boxes[index]).sum(1) == 0).sum() == 1:
            return int(index)
    raise AssertionError("every box is shared")

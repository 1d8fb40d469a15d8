"""Learn the head's concrete shapes and the class count, by running the graph."""

from __future__ import annotations

from onnxcam.bundle import (
    OUTPUT_ANCHORS,
    OUTPUT_CLASSES,
    OUTPUT_DETECTIONS,
    OUTPUT_LOGITS,
    OUTPUT_PIXELS,
)
from onnxcam.errors import ExportError, UnsupportedModelError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import head_tensors
from onnxcam.exporter.shapes import mark_data_sized, probe_shapes
from onnxcam.graph import source_of
from onnxcam.words import plural


def probe_head(draft: Draft) -> bool:
    """Record ``draft.shapes`` (every head tensor; the whole body when input gradients
    are wanted), ``draft.num_classes`` and ``draft.output`` (a segmenter's logits
    [N, K, h, w] hold pixels, a detector's [N, K, A] anchors, or for one that decodes
    its own detections ``detections``); refuse a labels file of
    another length.

    An analysis: the graph is left as it is, so this returns False. Preconditions:
    ``image`` is the input; ``logits`` and the activations are outputs; graph sorted.
    """
    graph = draft.graph
    start = draft.model_input if draft.options.whole_body else ""
    draft.shapes = mark_data_sized(draft.model, probe_shapes(
        draft.model, head_tensors(graph, start), draft.height, draft.width, draft.channels,
        draft.batch_size))
    logits = draft.shapes[source_of(graph, OUTPUT_LOGITS)]
    if draft.detection is not None and logits.rank == 3:
        draft.output = OUTPUT_DETECTIONS if draft.detection.decoded else OUTPUT_ANCHORS
    elif logits.rank not in (2, 4):
        raise UnsupportedModelError(
            f"the classifier output has shape {list(logits.dims)}; expected [N, K], or "
            "[N, K, h, w] for a segmenter")
    else:
        draft.output = OUTPUT_CLASSES if logits.rank == 2 else OUTPUT_PIXELS
    draft.num_classes = logits.dims[1]
    labels = draft.options.labels
    if labels and len(labels) != draft.num_classes:
        raise ExportError(f"the labels file has {plural(len(labels), 'label')}; the model "
                          f"has {plural(draft.num_classes, 'class')}")
    return False

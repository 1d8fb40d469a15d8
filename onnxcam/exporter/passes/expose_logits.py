"""Expose the classifier's output as the bundle output ``logits``: [N, K], or a
segmenter's per-pixel scores [N, K, h, w], class axis 1 whatever the model's layout."""

from __future__ import annotations

from onnx import helper

from onnxcam.bundle import OUTPUT_LOGITS, is_activation_output
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.draft import Draft
from onnxcam.graph import float_output
from onnxcam.layout import Layout

NHWC_TO_NCHW = [0, 3, 1, 2]


def expose_logits(draft: Draft) -> bool:
    """Make ``logits`` a copy of the classifier output (an NHWC segmenter's transposed
    to NCHW), first among the outputs, and drop every other output but the activations.

    The classifier output is the first graph output that is not ``activations``
    (or ``activations.i``). Precondition: ``free_reserved_names`` has run, so a
    ``logits`` output is this pass's own.
    """
    graph = draft.graph
    names = [o.name for o in graph.output]
    if names[:1] == [OUTPUT_LOGITS] and all(is_activation_output(n) for n in names[1:]):
        return False
    candidates = [name for name in names if not is_activation_output(name)]
    if not candidates:
        raise UnsupportedModelError("the model has no output")
    scores = candidates[0]
    if draft.pixels_layout is Layout.NHWC:
        # Before the Identity every bundle output is made by (``graph.source_of``).
        scores = "onnxcam/logits_nchw"
        graph.node.append(helper.make_node("Transpose", [candidates[0]], [scores],
                                           name=scores, perm=NHWC_TO_NCHW))
    graph.node.append(helper.make_node("Identity", [scores], [OUTPUT_LOGITS],
                                       name="onnxcam/logits"))
    kept = [o for o in graph.output if is_activation_output(o.name)]
    del graph.output[:]
    graph.output.append(float_output(OUTPUT_LOGITS, 2 if draft.pixels_layout is None else 4))
    graph.output.extend(kept)
    return True

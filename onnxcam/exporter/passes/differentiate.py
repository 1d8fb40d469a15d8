"""Choose how the bundle gets its gradients: by the VJP rules, or by finite differences."""

from __future__ import annotations

import logging

from onnxcam.bundle import OUTPUT_ANCHORS, OUTPUT_DETECTIONS, OUTPUT_PIXELS
from onnxcam.errors import ExportError, UnsupportedOpError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import unsupported_ops
from onnxcam.exporter.passes.add_fd_weights import add_fd_weights
from onnxcam.exporter.passes.add_gradients import add_gradients, add_guided_gradients

log = logging.getLogger(__name__)


def differentiate(draft: Draft) -> bool:
    """Add gradients by the rules when every head op has one, else (``auto``, ``fd``)
    fd channel weights; ``draft.gradient`` records which.

    Whole-network gradients, several layers, segmenters and detectors have no fd
    fallback.
    Preconditions:
    those of ``add_gradients`` (``draft.shapes`` from ``probe_head``). False when
    the draft has its gradients already.
    """
    if draft.gradient:
        return False
    if draft.output in DENSE and draft.options.gradient == "fd":
        raise ExportError(f"{DENSE[draft.output]} needs analytic gradients; drop --gradient fd")
    if draft.options.whole_body or len(draft.taps) > 1:
        return differentiate_exactly(draft)
    if draft.output in DENSE:
        return differentiate_dense(draft)
    if draft.options.gradient != "fd" and try_analytic(draft):
        return True
    if draft.batch_size:
        # fd perturbs a batch of copies of each image; this model runs at one batch only.
        missing = ", ".join(unsupported_ops(draft.graph)) or "see the log"
        raise ExportError(
            f"finite differences cannot run a model of fixed batch size {draft.batch_size}; "
            f"it needs analytic gradients (missing: {missing})")
    return add_fd_weights(draft)


def try_analytic(draft: Draft) -> bool:
    """``add_gradients`` when every head op has a rule that handles it; False, the
    draft untouched, when finite differences may take over instead."""
    analytic_only = draft.options.gradient == "analytic"
    missing = unsupported_ops(draft.graph)
    if missing:
        if analytic_only:
            raise UnsupportedOpError(", ".join(missing))
        log.warning("no gradient rule for %s in the head; using finite differences",
                    ", ".join(missing))
        return False
    # A rule may still refuse a node's attributes half way: what it added goes again.
    try:
        with draft.undone_on_error():
            add_gradients(draft)
    except UnsupportedOpError as exc:
        if analytic_only:
            raise
        log.warning("falling back to finite differences: %s", exc)
        return False
    return True


# Logits with more than a class axis, what each is, for the error an fd export gets.
DENSE = {OUTPUT_PIXELS: "a segmenter (logits [N, K, h, w])",
         OUTPUT_ANCHORS: "a detector (logits [N, K, anchors])",
         OUTPUT_DETECTIONS: "a detector (logits [1, K, anchors])"}


def differentiate_dense(draft: Draft) -> bool:
    """A segmenter's or detector's gradients, by the rules only: its targets are
    weightings of the pixels or anchors (``target_weights``: a detection is one entry),
    which fd channel weights for one class cannot serve."""
    model = DENSE[draft.output]
    missing = unsupported_ops(draft.graph)
    if missing:
        raise ExportError(f"{model} needs analytic gradients, and its head has ops "
                          f"without a gradient rule: {', '.join(missing)}")
    return add_gradients(draft)


def differentiate_exactly(draft: Draft) -> bool:
    """One backward pass for every layer (and the model input), then the guided one."""
    if draft.options.gradient == "fd":
        raise ExportError("input gradients, --guided and several layers need analytic "
                          "gradients; drop --gradient fd")
    start = draft.model_input if draft.options.whole_body else ""
    missing = unsupported_ops(draft.graph, start)
    if missing:
        raise UnsupportedOpError(", ".join(missing))
    changed = add_gradients(draft)
    if draft.options.guided:
        changed |= add_guided_gradients(draft)
    return changed

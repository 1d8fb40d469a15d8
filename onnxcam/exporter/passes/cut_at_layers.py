"""Find where the part of the graph after the layers begins, and check the cut there.

The engine runs many targets of one image by running the trunk once and the head
once per target (``onnxcam.head_cut``). This pass records the tensors the head reads
(``draft.head_inputs``) and which of them carry the batch, then runs the cut
bundle against the whole one; a cut that does not give the same gradients is not
recorded, and the engine then repeats the image per target instead.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_LOGITS,
    SEED,
    HeadInput,
)
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import layer_tensors
from onnxcam.exporter.shapes import OutputRunner, lean_session, random_images
from onnxcam.graph import source_of
from onnxcam.head_cut import head_boundary, split_at_layers, target_outputs

log = logging.getLogger(__name__)

# The cut runs the same kernels on the same numbers as the whole bundle, so its
# gradients agree to rounding; anything looser means the cut misses a dependency.
TOLERANCE = 1e-4


def cut_at_layers(draft: Draft) -> bool:
    """Record ``draft.head_inputs`` for an analytic bundle of free batch, if the cut
    holds. An analysis: the graph is left as it is, so this returns False.

    Preconditions: ``target_seed`` made ``SEED``; the target outputs exist; sorted.
    """
    graph = draft.graph
    if draft.gradient != "analytic" or draft.batch_size or \
            not any(SEED in node.output for node in graph.node):
        return False
    cut = find_cut(draft)
    if cut is None:
        log.warning("the graph cannot be cut at the layer (the part after it needs the "
                    "model's input): many targets of one image will run the whole model "
                    "once per target")
        return False
    names, probes = cut
    head_inputs = tuple(
        HeadInput(name, all(p[name].ndim and p[name].shape[0] == batch and
                            p[name].dtype.kind == "f" for batch, p in zip((1, 2), probes)),
                  int(helper.np_dtype_to_tensor_dtype(probes[0][name].dtype)))
        for name in names)
    problem = cut_problem(draft.model, head_inputs, draft)
    if problem:
        log.warning("the graph cannot be cut at the layer (%s): many targets of one image "
                    "will run the whole model once per target", problem)
        return False
    draft.head_inputs = head_inputs
    return False


def find_cut(draft: Draft) -> tuple[list[str], list[dict[str, np.ndarray]]] | None:
    """The boundary's names and their values at batches 1 and 2 (other images each).

    A boundary tensor that is not a float map yet changes with the batch (a Reshape's
    target shape taken from a tensor before the layer, say) cannot be handed over
    as it is: its producer joins the part after the layer, until none is left. None
    when that reaches the graph's inputs.
    """
    graph = draft.graph
    layers = layer_tensors(graph)
    made = {o for node in graph.node for o in node.output}
    pulled: set[str] = set()
    while True:
        names = head_boundary(graph, layers, pulled)
        runner = OutputRunner(draft.model, names, lean=True)  # one session, both batches
        probes = [runner(feeds(draft, batch)) for batch in (1, 2)]
        moving = {name for name in names if probes[0][name].dtype.kind != "f" and
                  (probes[0][name].shape != probes[1][name].shape or
                   not np.array_equal(probes[0][name], probes[1][name]))}
        if not moving:
            return names, probes
        if not moving <= made:
            return None
        pulled |= moving


def feeds(draft: Draft, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {INPUT_IMAGE: random_images(batch, draft.height, draft.width, draft.channels,
                                       seed=seed or batch),
            INPUT_TARGET: np.zeros(batch, np.int64)}


def cut_problem(model: onnx.ModelProto, head_inputs: tuple[HeadInput, ...], draft: Draft
                ) -> str:
    """Why the cut at ``head_inputs`` does not hold, or "" when it does."""
    try:
        error = cut_error(model, head_inputs, draft)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors too: the cut fails
        return str(exc).splitlines()[0] if str(exc) else repr(exc)
    return f"its gradients differ by {error:.1e}" if error > TOLERANCE else ""


def cut_error(model: onnx.ModelProto, head_inputs: tuple[HeadInput, ...], draft: Draft
              ) -> float:
    """The largest difference, relative to the largest value, between the target
    outputs of the cut bundle and the whole one, for three targets of two images."""
    trunk, head = split_at_layers(model, head_inputs)
    inputs = feeds(draft, 2, seed=7)
    boundary = [h.name for h in head_inputs if h.name != SEED]
    values = dict(zip(boundary, lean_session(trunk).run(boundary, {
        INPUT_IMAGE: inputs[INPUT_IMAGE]})))
    rows = np.array([1, 0, 1])
    logits = draft.shapes[source_of(model.graph, OUTPUT_LOGITS)].dims
    seeds = np.random.default_rng(0).normal(size=(3, *logits[1:])).astype(np.float32)
    head_feeds = {h.name: values[h.name][rows] if h.batched else values[h.name]
                  for h in head_inputs if h.name != SEED}
    wanted = target_outputs(model.graph)
    cut = lean_session(head).run(wanted, {**head_feeds, SEED: seeds})
    whole = lean_session(model).run(wanted, {
        INPUT_IMAGE: inputs[INPUT_IMAGE][rows], INPUT_TARGET: np.zeros(3, np.int64),
        INPUT_TARGET_WEIGHTS: seeds})
    return max(float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))
               for a, b in zip(cut, whole))


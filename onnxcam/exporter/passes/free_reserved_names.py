"""Move source tensors out of the way of the bundle's own input and output names."""

from __future__ import annotations

import dataclasses

from onnxcam.bundle import RESERVED_NAMES
from onnxcam.exporter.draft import Draft
from onnxcam.graph import rename_tensors, tensor_names


def free_reserved_names(draft: Draft) -> bool:
    """Rename source tensors called ``logits``, ``cam``, ``image``... to ``<name>__source``,
    and the taps with them.

    Precondition: no other pass has run (afterwards those names are the bundle's own).
    """
    graph = draft.graph
    taken = tensor_names(graph) | {o.name for o in graph.output}
    mapping = {name: f"{name}__source" for name in RESERVED_NAMES if name in taken}
    rename_tensors(graph, mapping)
    draft.taps = [dataclasses.replace(tap, tensor=mapping.get(tap.tensor, tap.tensor))
                  for tap in draft.taps]
    return bool(mapping)

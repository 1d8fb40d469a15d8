"""Drop what no output needs and sort the nodes: the passes after it read a sorted graph."""

from __future__ import annotations

from onnxcam.exporter.draft import Draft
from onnxcam.graph import prune_unused, toposort


def tidy(draft: Draft) -> bool:
    """Sort topologically, then prune nodes and initializers no output depends on
    (pruning walks the graph backwards, so it needs the order).

    False when nothing went and the order held.
    """
    graph = draft.graph
    before = [tuple(node.output) for node in graph.node], len(graph.initializer)
    toposort(graph)
    prune_unused(graph)
    return ([tuple(node.output) for node in graph.node], len(graph.initializer)) != before

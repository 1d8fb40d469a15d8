"""Graph rewrites that turn a classifier into a bundle, one small pass per file.

Every pass is ``def name(draft: Draft) -> bool``: it rewrites ``draft.model`` in
place, records what it decided on the draft, and returns whether it changed the
graph (False means the graph is byte for byte as it was). Passes find each
other's work through the bundle's output names (``onnxcam.bundle``). The order
they run in is ``onnxcam.exporter.pipeline.PASSES``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from onnxcam.exporter.draft import Draft

log = logging.getLogger(__name__)

Pass = Callable[[Draft], bool]


def run_passes(draft: Draft, passes: Iterable[Pass]) -> Draft:
    """Apply ``passes`` in order; return the draft."""
    for apply in passes:
        changed = apply(draft)
        log.debug("pass %s: %s", apply.__name__, "changed the graph" if changed else "no change")
    return draft


__all__ = ["Pass", "run_passes"]

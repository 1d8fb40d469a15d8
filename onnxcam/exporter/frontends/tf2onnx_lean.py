"""tf2onnx's conversion in a fraction of its memory, for the Keras frontend.

tf2onnx's usual path holds many copies of the weights at once: grappler's copies of
the frozen graph, and one re-serialised copy per optimizer run. Converting Keras
VGG16 (550 MB of weights) peaked at 11.9 GB and took 75 s, ResNet50 at 2.75 GB. Its
large-model path freezes without grappler and keeps the big constants out of
TensorFlow's graph; run with its optimizers as one (``one_update_optimizer``) it
peaks at 6.4 GB and 1.8 GB. The graph differs from the usual one only in what onnxruntime fuses
when it loads it (BatchNormalization stays Mul and Add), and verification holds
the bundle against the Keras model either way. Should the lean path fail, the usual
one runs.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

log = logging.getLogger(__name__)


def convert(from_tf: Callable[..., Any], *args: Any, **kwargs: Any) -> onnx.ModelProto:
    """``from_tf(*args, **kwargs)`` (tf2onnx's ``from_keras`` or ``from_function``),
    by the lean path, or the usual one if that fails; the model with its weights in it.
    Errors of the usual path are tf2onnx's own."""
    try:
        with numpy_product_alias():
            model, storage = from_tf(*args, large_model=True, **kwargs)
        model = with_weights_inside(model, storage.name_to_tensor_data)
    except Exception as exc:  # noqa: BLE001 - the usual path is the judge
        log.info("tf2onnx's large-model path failed (%s); converting the usual way",
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        kwargs.pop("optimizers", None)
        model, _ = from_tf(*args, **kwargs)
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Give the heap a conversion freed back to the system (glibc's ``malloc_trim``;
    nothing elsewhere): 0.2 GB after ResNet50's and ConvNeXtTiny's, which the export's
    later steps would otherwise add to (ConvNeXtTiny's peak: 2093 -> 1984 MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_weights_inside(model: onnx.ModelProto, data: dict[str, bytes]) -> onnx.ModelProto:
    """``model`` with the tensors it stores outside (in ``data``, by location) inside."""
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            tensor.raw_data = data.pop(location)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


@contextmanager
def numpy_product_alias() -> Iterator[None]:
    """``np.product`` while the block runs: tf2onnx 1.17's large-model path calls it,
    and numpy 2 removed it (``np.prod`` is the same function)."""
    added = not hasattr(np, "product")
    if added:
        np.product = np.prod  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.product  # type: ignore[attr-defined]


def one_update_optimizer() -> dict[str, Any]:
    """tf2onnx's own optimizers, in its order, as one optimizer for ``optimizers=``.

    The graph that comes out is the same. tf2onnx rewrites every node's protobuf after
    each of its dozen optimizers, and the superseded copies of the weights stay in
    memory until the conversion ends: ResNet50's 90 MB of weights grew the process by
    2 GB. Run as one, the rewrite happens once per round. It reads tf2onnx's
    internals; should they change, it fails and ``convert`` takes the usual path.
    """
    from tf2onnx import optimizer
    from tf2onnx.optimizer.optimizer_base import GraphOptimizerBase

    class OneUpdate(GraphOptimizerBase):
        def _optimize(self, graph: Any) -> Any:
            changed = False
            for factory in optimizer._get_optimizers().values():
                step = factory()
                step.opt_iteration = self.opt_iteration
                graph = step._optimize(graph)
                graph.delete_unused_nodes(graph.outputs)
                changed = changed or bool(step.graph_been_opt)
            self.graph_been_opt = changed  # tf2onnx runs another round while this is True
            return graph

    return {"tf2onnx": OneUpdate}

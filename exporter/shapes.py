"""Concrete tensor shapes, learned by running the graph at batch sizes 1 and 2.

Static inference misses shapes that exporters compute at run time (tf2onnx and
torch graphs both do this), so the exporter asks onnxruntime instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import INPUT_IMAGE
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.runtime import cpu_session


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is only a hint for output types here
        inferred = model
    graph = inferred.graph
    types = {}
    for info in list(graph.value_info) + list(graph.output) + list(graph.input):
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def run_with_outputs(
    model: onnx.ModelProto, names: Iterable[str], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run ``model`` with ``names`` added as graph outputs; return them by name."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = _value_types(model)
    existing = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(
                helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
            )
    session = cpu_session(probe.SerializeToString())
    values = session.run(wanted, feeds)
    return dict(zip(wanted, values))


def random_images(batch: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, height, width, channels), dtype=np.uint8)


def probe_shapes(
    model: onnx.ModelProto, names: Iterable[str], height: int, width: int, channels: int,
    fixed_batch: int = 0,
) -> dict[str, TensorShape]:
    """Shapes of ``names`` at batch 1, with the axes that grow with the batch marked.

    A model of ``fixed_batch`` runs at that batch only: its shapes are taken there,
    and no axis grows (every shape is static, which is what its gradients may assume).
    Precondition: the model's input is the bundle's uint8 ``image``.
    """
    names = list(names)
    runs = []
    for batch in (fixed_batch,) if fixed_batch else (1, 2):
        feeds = {INPUT_IMAGE: random_images(batch, height, width, channels, seed=batch)}
        try:
            runs.append(run_with_outputs(model, names, feeds))
        except Exception as exc:
            raise UnsupportedModelError(
                f"the model does not run at batch size {batch}: {str(exc).splitlines()[0]}. "
                "If it was exported with a fixed batch, export it with a dynamic one "
                "(torch: dynamic_axes={'input': {0: 'N'}}, or dynamo=True with dynamic_shapes), "
                "or pass the torch module itself to onnxcam.export"
            ) from exc
    shapes = {}
    for name in names:
        one, two = runs[0][name].shape, runs[-1][name].shape
        if len(one) != len(two):
            raise UnsupportedModelError(f"tensor {name!r} changes rank with the batch size")
        shapes[name] = TensorShape(tuple(int(d) for d in one),
                                   tuple(a != b for a, b in zip(one, two)))
    return shapes

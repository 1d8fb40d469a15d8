"""Concrete tensor shapes, learned by running the graph at batch sizes 1 and 2.

Static inference misses shapes that exporters compute at run time (tf2onnx and
torch graphs both do this), so the exporter asks onnxruntime instead.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcam.bundle import INPUT_IMAGE
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.runtime import cpu_session


def run_with_outputs(
    model: onnx.ModelProto, names: Iterable[str], feeds: dict[str, np.ndarray],
    lean: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` with ``names`` added as graph outputs; return them by name."""
    return OutputRunner(model, names, lean)(feeds)


class OutputRunner:
    """One session of ``model`` with ``names`` as extra outputs, for several runs.

    The outputs are declared without a type (onnxruntime takes the producer's), so
    no shape inference runs, and the model is not copied: it is serialized with the
    outputs appended and then restored. Both matter for models of a few hundred MB.
    ``lean`` sessions (see ``cpu_session``) load from a file, so that the serialized
    bytes are gone before onnxruntime builds its own copy of the weights.
    """

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], lean: bool = False
                 ) -> None:
        self.names = list(dict.fromkeys(names))
        if lean:
            self.session = lean_session(model, self.names)
        else:
            self.session = cpu_session(serialized_with_outputs(model, self.names))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def serialized_with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """``model`` serialized with ``names`` as extra outputs; ``model`` is left as it is."""
    existing = {o.name for o in model.graph.output}
    added = [onnx.ValueInfoProto(name=name) for name in names if name not in existing]
    model.graph.output.extend(added)
    try:
        return model.SerializeToString()
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]


def lean_session(model: onnx.ModelProto, names: list[str] | None = None) -> ort.InferenceSession:
    """A ``lean`` CPU session (see ``cpu_session``) of ``model`` with ``names`` as extra
    outputs, loaded from a temporary file: the serialized bytes are gone before
    onnxruntime builds its own copy of the weights."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(serialized_with_outputs(model, names or []))
        return cpu_session(str(path), lean=True)


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
    runner: OutputRunner | None = None
    for batch in (fixed_batch,) if fixed_batch else (1, 2):
        feeds = {INPUT_IMAGE: random_images(batch, height, width, channels, seed=batch)}
        try:
            runner = runner or OutputRunner(model, names, lean=True)
            runs.append(runner(feeds))
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

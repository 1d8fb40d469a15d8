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
from onnx import numpy_helper

from onnxcam.bundle import INPUT_IMAGE
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.graph import (
    LARGE_TENSOR_BYTES,
    constant_tensors,
    data_sized_tensors,
    shell_of,
    tensor_bytes,
)
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

    def __call__(self, feeds: dict[str, np.ndarray], names: list[str] | None = None
                 ) -> dict[str, np.ndarray]:
        """The outputs ``names`` (a subset of the runner's; all of them by default)."""
        names = self.names if names is None else names
        return dict(zip(names, self.session.run(names, feeds)))


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
    outputs, loaded from temporary files, its large weights beside the graph
    (``write_weights_apart``): onnxruntime then reads them straight into its tensors,
    without first holding the whole model as a protobuf of its own. The session may
    map the weights file after the folder is gone: Linux keeps a deleted file for
    whoever maps it; where a mapped file cannot be deleted, the folder is left behind."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "model.onnx"
        write_weights_apart(model, names or [], path)
        return cpu_session(str(path), lean=True)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on ``model``, its large weights written apart
    (``write_weights_apart``): given the model itself, the checker serializes it and
    parses it again, two more copies of the weights (1 GB for VGG)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        write_weights_apart(model, [], path)
        onnx.checker.check_model(str(path))


def write_weights_apart(model: onnx.ModelProto, names: list[str], path: Path) -> None:
    """``model`` with ``names`` as extra outputs to ``path``, its large initializers as
    ONNX external data in ``path.name + '.weights'`` beside it. ``model`` is left as
    it is, and no second copy of its weights is made: the file's graph is built from
    the nodes and small tensors, and the weights are written one at a time."""
    shell = shell_of(model)
    existing = {o.name for o in model.graph.output}
    shell.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    weights = path.with_name(path.name + ".weights")
    with weights.open("wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or \
                    tensor_bytes(tensor) < LARGE_TENSOR_BYTES:
                shell.graph.initializer.append(tensor)
                continue
            stub = shell.graph.initializer.add(name=tensor.name,
                                               data_type=tensor.data_type, dims=tensor.dims)
            raw = tensor.raw_data if tensor.HasField("raw_data") else \
                numpy_helper.to_array(tensor).tobytes()
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", weights.name), ("offset", str(data.tell())),
                               ("length", str(len(raw)))):
                stub.external_data.add(key=key, value=value)
            data.write(raw)
    path.write_bytes(shell.SerializeToString())


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
    # Parameters are not run for (VGG's head reads 450 MB of them), and what is computed
    # from them alone is run at batch 1 only: neither grows with the batch.
    parameters = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer}
    computed = [name for name in names if name not in parameters]
    constant = constant_tensors(model.graph)
    runs: list[dict[str, tuple[int, ...]]] = []
    runner: OutputRunner | None = None
    for batch in (fixed_batch,) if fixed_batch else (1, 2):
        feeds = {INPUT_IMAGE: random_images(batch, height, width, channels, seed=batch)}
        fetched = [n for n in computed if not runs or n not in constant]
        try:
            runner = runner or OutputRunner(model, computed, lean=True)
            got = {name: value.shape for name, value in runner(feeds, fetched).items()}
            runs.append({**parameters, **(runs[0] if runs else {}), **got})
        except Exception as exc:
            raise UnsupportedModelError(
                f"the model does not run at batch size {batch}: {str(exc).splitlines()[0]}. "
                "If it was exported with a fixed batch, export it with a dynamic one "
                "(torch: dynamic_axes={'input': {0: 'N'}}, or dynamo=True with dynamic_shapes), "
                "or pass the torch module itself to onnxcam.export"
            ) from exc
    shapes = {}
    for name in names:
        one, two = runs[0][name], runs[-1][name]
        if len(one) != len(two):
            raise UnsupportedModelError(f"tensor {name!r} changes rank with the batch size")
        shapes[name] = TensorShape(tuple(int(d) for d in one),
                                   tuple(a != b for a, b in zip(one, two)))
    return shapes


def mark_data_sized(model: onnx.ModelProto, shapes: dict[str, TensorShape]
                    ) -> dict[str, TensorShape]:
    """``shapes`` with the axes whose size follows the values marked as growing, as a
    batch axis is: the proposals of a two-stage detector, counted by a NonZero or a
    NonMaxSuppression, so the gradients read those sizes at run time. Such an axis
    is one that ONNX's shape inference (propagating values) cannot size, of a tensor
    computed from a data-sized op (``data_sized_tensors``). Graph must be sorted."""
    sized = data_sized_tensors(model.graph) & set(shapes)
    if not sized:
        return shapes
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    known = {info.name: info.type.tensor_type.shape for info in
             [*inferred.graph.value_info, *inferred.graph.output]}
    marked = dict(shapes)
    for name in sized:
        shape, dims = shapes[name], known.get(name)
        if dims is None or len(dims.dim) != shape.rank:
            unknown = [True] * shape.rank
        else:
            unknown = [not dim.HasField("dim_value") for dim in dims.dim]
        marked[name] = TensorShape(
            shape.dims, tuple(grows or free for grows, free in zip(shape.batched, unknown)),
            tuple(unknown))
    return marked

"""Bundles an attacker could publish: a good bundle (``cnn_bundle``) altered in one way.
Shared by the floor's reader tests and the worker's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def with_metadata(bundle: Path, **changes: str) -> bytes:
    """The bundle with ``onnxcam.<key>`` metadata set to the given strings."""
    model = onnx.load(str(bundle))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"onnxcam.{key}": value for key, value in changes.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def reading_outside(bundle: Path, location: str) -> tuple[bytes, int]:
    """The bundle with its smallest float weight stored as external data at the
    relative ``location``: onnxruntime reads it from its working folder. Returns the
    bytes and how many bytes of that file the weight takes."""
    model = onnx.load(str(bundle))
    weight = min((t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
                  and t.dims), key=lambda t: numpy_helper.to_array(t).size)
    length = 4 * numpy_helper.to_array(weight).size
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    return model.SerializeToString(), length


def _zero_added_to_logits(model: onnx.ModelProto, tensor: str, prefix: str) -> None:
    """Make the logits depend on ``tensor`` (float) without changing them: logits +
    0 * sum(tensor), so no runtime may prune the nodes that make it."""
    from onnx import helper

    nodes = list(model.graph.node)
    (at,) = [i for i, n in enumerate(nodes) if "logits" in n.output]
    source = nodes[at].input[0]
    added = [n for n in nodes if n.output[0].startswith(f"{prefix}/")]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32),
                                                           f"{prefix}/zero"))
    added += [
        helper.make_node("ReduceSum", [tensor], [f"{prefix}/sum"], keepdims=0),
        helper.make_node("Mul", [f"{prefix}/sum", f"{prefix}/zero"], [f"{prefix}/nothing"]),
        helper.make_node("Add", [source, f"{prefix}/nothing"], [f"{prefix}/logits"]),
    ]
    nodes[at].input[0] = f"{prefix}/logits"
    kept = [n for n in nodes if not n.output[0].startswith(f"{prefix}/")]
    del model.graph.node[:]
    model.graph.node.extend(kept[:at] + added + kept[at:])
    onnx.checker.check_model(model)


def with_bomb(bundle: Path, op: str, elements: int) -> bytes:
    """The bundle with a float tensor of ``elements`` made from a few bytes of constants
    (``ConstantOfShape`` or ``Expand``), which the logits then read."""
    from onnx import helper

    model = onnx.load(str(bundle))
    shape = [elements] if op == "ConstantOfShape" else [elements // 1000, 1000]
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64),
                                                           "bomb/shape"))
    if op == "ConstantOfShape":
        model.graph.node.append(helper.make_node(
            "ConstantOfShape", ["bomb/shape"], ["bomb/tensor"],
            value=numpy_helper.from_array(np.ones(1, np.float32))))
    else:
        model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32),
                                                               "bomb/one"))
        model.graph.node.append(helper.make_node("Expand", ["bomb/one", "bomb/shape"],
                                                 ["bomb/tensor"]))
    _zero_added_to_logits(model, "bomb/tensor", "bomb")
    return model.SerializeToString()


def with_runtime_bomb(bundle: Path, elements: int) -> bytes:
    """The bundle with a float tensor of ``elements`` whose size comes from the image's
    pixels (``0 * min(image) + elements``): no shape inference can see it coming, and
    only running the graph allocates it."""
    from onnx import helper

    model = onnx.load(str(bundle))
    for name, value in (("runtime/zero_i", np.zeros((), np.int64)),
                        ("runtime/elements", np.array([elements], np.int64))):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    model.graph.node.extend([
        helper.make_node("ReduceMin", ["image"], ["runtime/min"], keepdims=0),
        helper.make_node("Cast", ["runtime/min"], ["runtime/min_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["runtime/min_i", "runtime/zero_i"], ["runtime/nought"]),
        helper.make_node("Add", ["runtime/elements", "runtime/nought"], ["runtime/shape"]),
        helper.make_node("ConstantOfShape", ["runtime/shape"], ["runtime/tensor"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
    ])
    _zero_added_to_logits(model, "runtime/tensor", "runtime")
    return model.SerializeToString()


def with_image_input(bundle: Path, batch: int, side: int) -> bytes:
    """The bundle fixed at ``batch`` images of ``side`` x ``side`` (metadata and the
    graph's image input agree, within the metadata's bounds), though its graph still
    reads 16 x 16: nothing checks that before the engine pads a batch to that size."""
    model = onnx.load_from_string(with_metadata(bundle, batch_size=str(batch),
                                                input_height=str(side), input_width=str(side)))
    image = next(i for i in model.graph.input if i.name == "image")
    dims = image.type.tensor_type.shape.dim
    for axis, value in ((0, batch), (1, side), (2, side)):
        dims[axis].Clear()
        dims[axis].dim_value = value
    return model.SerializeToString()


def detector_output_reshaped(bundle: Path, name: str, shape: list[int] | None,
                             anchors: int | None = None) -> bytes:
    """A detection bundle whose output ``name`` (logits or boxes) is no longer what its
    metadata says: gone from the graph's outputs (``shape`` None), or reshaped to
    ``shape`` (Reshape's: 0 keeps an axis, -1 takes the rest), after keeping only its
    first ``anchors`` anchors if given. Declared with ``shape``'s sizes, free where it
    has 0 or -1 (as the exporter declares all of them)."""
    from onnx import helper

    model = onnx.load(str(bundle))
    (output,) = [o for o in model.graph.output if o.name == name]
    if shape is None:
        model.graph.output.remove(output)
        return model.SerializeToString()
    source = f"{name}/original"
    for node in model.graph.node:
        for names in (node.input, node.output):
            for position, each in enumerate(names):
                if each == name:
                    names[position] = source
    if anchors is not None:
        for key, value in (("starts", 0), ("ends", anchors), ("axes", 1)):
            model.graph.initializer.append(numpy_helper.from_array(
                np.array([value], np.int64), f"{name}/{key}"))
        model.graph.node.append(helper.make_node(
            "Slice", [source, f"{name}/starts", f"{name}/ends", f"{name}/axes"],
            [f"{name}/sliced"]))
        source = f"{name}/sliced"
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64),
                                                           f"{name}/shape"))
    model.graph.node.append(helper.make_node("Reshape", [source, f"{name}/shape"], [name]))
    output.CopyFrom(helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [size if size > 0 else f"{name}_{axis}"
                                  for axis, size in enumerate(shape)]))
    return model.SerializeToString()

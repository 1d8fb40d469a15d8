"""What a VJP rule may ask about the forward graph: shapes, constants, opset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcam.graph import GraphBuilder, attrs, reduce


def string_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    """A string attribute as text (onnx hands them over as bytes), or ``default``."""
    value = attrs(node).get(name)
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class TensorShape:
    """A probed shape: sizes at batch 1, and which axes grow with the batch.

    An axis sized by the values (``by_data``: a two-stage detector's proposals, in a
    bundle of one image) is marked as growing too, so that rules read its size at
    run time; but it holds no samples, so rules may mix along it.
    """

    dims: tuple[int, ...]
    batched: tuple[bool, ...]
    by_data: tuple[bool, ...] = ()

    @property
    def rank(self) -> int:
        return len(self.dims)

    def holds_samples(self, axis: int) -> bool:
        """Whether ``axis`` is the batch's: an op along it would mix the samples."""
        return self.batched[axis] and not (self.by_data and self.by_data[axis])


class VjpContext:
    def __init__(
        self,
        builder: GraphBuilder,
        shapes: Mapping[str, TensorShape],
        constants: Mapping[str, np.ndarray],
        opset: int,
        needed: set[str] | None = None,
        guided: bool = False,
        whole_body: bool = False,
    ) -> None:
        self.b = builder
        self.shapes = shapes
        self.constants = constants
        self.opset = opset
        self.needed = needed
        self.guided = guided
        # Passes through the whole body may pick forms that keep it fast on
        # onnxruntime (see the Conv and Relu rules); head-only passes keep theirs,
        # so bundles without input gradients stay the graphs they always were.
        self.whole_body = whole_body

    def needs(self, name: str) -> bool:
        """Whether a gradient for ``name`` is wanted (it lies on the differentiated path)."""
        return bool(name) and (self.needed is None or name in self.needed)

    def shape(self, name: str) -> TensorShape:
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    # -- reductions whose axes moved from attribute to input across opsets --

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool) -> str:
        return reduce(self.b, op_type, x, axes, keepdims, self.opset)

    def unbroadcast(self, grad: str, out_name: str, in_name: str) -> str:
        """Sum ``grad`` (shaped like ``out_name``) down to the shape of ``in_name``."""
        out, inp = self.shape(out_name), self.shape(in_name)
        lead = out.rank - inp.rank
        axes = list(range(lead))
        for j, (size, grows) in enumerate(zip(inp.dims, inp.batched)):
            o = j + lead
            if size == 1 and not grows and (out.dims[o] != 1 or out.batched[o]):
                axes.append(o)
        if not axes and lead == 0:
            return grad
        if axes:
            grad = self.reduce("ReduceSum", grad, axes, keepdims=True)
        return self.reshape_like(grad, in_name)

    def reshape_like(self, x: str, like: str) -> str:
        return self.b.op("Reshape", [x, self.b.op("Shape", [like])])

    def zeros_like(self, like: str) -> str:
        return self.b.op("ConstantOfShape", [self.b.op("Shape", [like])])

    def mask(self, condition: str, grad: str) -> str:
        """``grad`` where ``condition`` holds, else 0."""
        return self.b.op("Where", [condition, grad, self.zero()])

    def zero(self) -> str:
        return self.b.const(np.zeros((), np.float32), "zero")

    def scalar(self, value: float) -> str:
        return self.b.scalar(value)

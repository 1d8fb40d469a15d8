"""What the ONNX frontend reads off a transformer's graph: which tensors belong to
attention (never a default target), which sums are residual, and where tokens lie.

Attention is found by its shape in the graph, not by names: a product of two
tensors that both come from the image (queries times keys) leads to a Softmax,
whose output is multiplied by a third such tensor (the values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx

from onnxcam.graph import consumers, producers
from onnxcam.layout import TokenGrid

# Products of two computed tensors: attention's scores and its weighted values.
PRODUCTS = frozenset({"MatMul", "Einsum"})
# Ops that move or pick values without mixing tokens: the heads' split, merge and
# transposes, q/k/v picked from one tensor, and the scale multiplied in.
HEAD_VIEWS = frozenset({"Transpose", "Reshape", "Split", "Slice", "Gather", "Squeeze",
                        "Unsqueeze", "Identity", "Cast", "Mul", "Div", "Flatten"})
# How far from a Softmax its scores' product and its values' product may lie: CaiT's
# talking heads put a linear map over the heads, with transposes, on either side.
REACH = 12
# Tokens a transformer puts before its grid: ViT's class token, DeiT's distillation token.
MAX_LEADING_TOKENS = 2


def attention_tensors(graph: onnx.GraphProto, live: set[str]) -> frozenset[str]:
    """The tensors of every attention in ``graph`` (topologically sorted): the queries,
    keys and values as split into heads, the scores, the Softmax and what lies between,
    and the weighted values until their heads are merged by a projection. ``live``
    holds the tensors computed from the image."""
    made_by, used_by = producers(graph), consumers(graph)
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        scores = walk_to_product(node, live, lambda n: computed_inputs(n, live, made_by))
        weighted = walk_to_product(node, live, lambda n: [c for o in n.output
                                                          for c in used_by.get(o, [])])
        if scores is None or weighted is None:
            continue  # a classifier's own Softmax, or a gate: not attention
        found.update(scores | weighted)
        for product in (made_by[o] for o in scores | weighted if o in made_by):
            if not is_product(product, live):
                continue
            for operand in computed_inputs(product, live, made_by):
                found.update(head_views_before(operand, live, made_by))
            found.update(head_views_after(product, used_by))
    return frozenset(found)


def computed_inputs(node: onnx.NodeProto, live: set[str],
                    made_by: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes that make ``node``'s inputs computed from the image."""
    return [made_by[i] for i in node.input if i in live and i in made_by]


def is_product(node: onnx.NodeProto, live: set[str]) -> bool:
    """A MatMul or Einsum of two computed tensors."""
    return node.op_type in PRODUCTS and reads(node, live) >= 2


def reads(node: onnx.NodeProto, live: set[str]) -> int:
    """How many of ``node``'s inputs are computed from the image."""
    return sum(1 for i in node.input if i in live)


def walk_to_product(softmax: onnx.NodeProto, live: set[str],
                    step: Callable[[onnx.NodeProto], list[onnx.NodeProto]]) -> set[str] | None:
    """The outputs of the nodes from ``softmax`` (inclusive) to the nearest product of
    two computed tensors, following ``step`` (back to inputs, or on to consumers)
    through nodes that read one computed tensor; None if no product is that near."""
    passed: set[str] = set()
    frontier = [softmax]
    for _ in range(REACH):
        following = []
        for node in frontier:
            if node is not softmax and is_product(node, live):
                return passed | {node.output[0]}
            if node is not softmax and reads(node, live) != 1:
                continue  # a residual sum or a concatenation: not inside attention
            passed.add(node.output[0])
            following.extend(step(node))
        frontier = [n for n in following if n.output and n.output[0] not in passed]
        if not frontier:
            return None
    return None


def head_views_before(node: onnx.NodeProto, live: set[str],
                      made_by: dict[str, onnx.NodeProto]) -> set[str]:
    """The outputs of the head views that lead to a product's operand (splitting the
    projected queries, keys or values into heads), back to the projection."""
    found: set[str] = set()
    frontier = [node]
    while frontier:
        current = frontier.pop()
        if current.op_type not in HEAD_VIEWS or reads(current, live) != 1 \
                or current.output[0] in found:
            continue  # the projection, or a product of two tensors: the heads start here
        found.update(o for o in current.output if o)
        frontier.extend(computed_inputs(current, live, made_by))
    return found


def head_views_after(node: onnx.NodeProto, used_by: dict[str, list[onnx.NodeProto]]
                     ) -> set[str]:
    """The outputs of the head views that follow the weighted values (merging the
    heads), up to the projection."""
    found: set[str] = set()
    frontier = [c for c in used_by.get(node.output[0], [])]
    while frontier:
        current = frontier.pop()
        if current.op_type not in HEAD_VIEWS - {"Mul", "Div"} or current.output[0] in found:
            continue
        found.update(o for o in current.output if o)
        frontier.extend(c for o in current.output for c in used_by.get(o, []))
    return found


def is_residual_sum(node: onnx.NodeProto, live: set[str]) -> bool:
    """An Add of two computed tensors (a residual connection); a Linear's bias, a
    position embedding or an attention bias is added to one."""
    return node.op_type in ("Add", "Sum") and reads(node, live) >= 2


class TokenGrids:
    """The grids of the 4-D maps met so far, to read token tensors [1, T, C] on.

    A vision transformer flattens a convolution's h x w map into tokens, row by row,
    after up to ``MAX_LEADING_TOKENS`` class or distillation tokens. A hierarchical
    one then subsamples the tokens (LeViT's attention keeps every other row and
    column: ceil(h/2) x ceil(w/2)) or merges them by pooling (floor(h/2) x floor(w/2)).
    So T - k tokens (0 <= k <= MAX_LEADING_TOKENS) lie on a map's grid, or T tokens
    on that grid taken with a stride; the smallest stride wins, then the latest map.
    """

    def __init__(self) -> None:
        self.grids: list[tuple[int, int]] = []  # latest first, no repeats

    def see(self, op: str, shape: tuple[int, ...]) -> None:
        """Note a convolution's map [N, C, h, w]."""
        if op == "Conv" and len(shape) == 4 and shape[2] * shape[3] >= 2:
            grid = (shape[2], shape[3])
            self.grids = [grid, *(g for g in self.grids if g != grid)]

    def grid(self, shape: tuple[int, ...]) -> TokenGrid | None:
        """The grid of a token tensor [1, T, C] (at batch 1), or None if it is none.
        Attention's own tensors (heads or the sequence first) do not have the batch
        first at batch 1."""
        if len(shape) != 3 or shape[0] != 1 or not self.grids:
            return None
        largest = max(max(g) for g in self.grids)
        for stride in range(1, largest + 1):
            # Leading tokens only on a map's own grid: a subsampled one has none seen
            # yet (LeViT), and short sequences would otherwise fit too many grids.
            most = MAX_LEADING_TOKENS if stride == 1 else 0
            for height, width in self.grids:
                for rows, cols in strided(height, width, stride):
                    leading = shape[1] - rows * cols
                    if rows * cols >= 2 and 0 <= leading <= most:
                        return TokenGrid(leading, rows, cols)
        return None


def strided(height: int, width: int, stride: int) -> Iterable[tuple[int, int]]:
    """A grid taken every ``stride`` cells (ceil), then pooled by ``stride`` (floor)."""
    yield -(-height // stride), -(-width // stride)
    if stride > 1:
        yield height // stride, width // stride

"""Transformers' token grids, attention tensors and residual sums, on tiny graphs.

A LeViT-like model in a few nodes: a 4x4 patch map flattened into 16 tokens, one
attention whose queries are every other row and column (2x2), and a head that
averages the 4 tokens it returns. Before, the default was attention's own
[1, 4, 2, 4] tensor and the 2x2 tokens were refused as not 4-D; the map on those
tokens is worked out here in float64 from the weights. The rule for transformer
blocks is held on hand-made layer lists (CaiT's class attention, PVT's query bias).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from onnxcam.exporter.layers import LayerInfo, choose_layers, default_layer
from onnxcam.exporter.transformer_graph import TokenGrids
from onnxcam.layout import TokenGrid
from tests.cam_references import assert_maps_close, ref_gradcam
from tests.exporter.micrographs import info, init, model_of

RNG = np.random.default_rng(7)
CHANNELS, HEADS, CLASSES = 8, 2, 3
WEIGHTS = {name: RNG.normal(0, 0.5, shape).astype(np.float32) for name, shape in (
    ("patch", (CHANNELS, 3, 4, 4)), ("wq", (CHANNELS, CHANNELS)), ("wk", (CHANNELS, CHANNELS)),
    ("wv", (CHANNELS, CHANNELS)), ("wp", (CHANNELS, CHANNELS)), ("bp", (CHANNELS,)),
    ("fc", (CHANNELS, CLASSES)), ("fc_b", (CLASSES,)))}


def subsampling_attention() -> object:
    """16x16 image -> 4x4 patches -> 16 tokens -> attention with 2x2 queries -> mean -> 3."""
    d = CHANNELS // HEADS
    shapes = {"to_seq": [1, CHANNELS, 16], "to_grid": [1, 4, 4, CHANNELS],
              "q_seq": [1, 4, CHANNELS], "q_heads": [1, 4, HEADS, d],
              "kv_heads": [1, 16, HEADS, d], "merged": [1, 4, CHANNELS]}
    inits = [init(k, v) for k, v in WEIGHTS.items()]
    inits += [init(k, v, np.int64) for k, v in shapes.items()]
    inits += [init("starts", [0, 0], np.int64), init("ends", [4, 4], np.int64),
              init("axes", [1, 2], np.int64), init("steps", [2, 2], np.int64),
              init("scale", 1 / np.sqrt(d))]
    n = helper.make_node
    nodes = [
        n("Conv", ["image", "patch"], ["patches"], strides=[4, 4]),
        n("Reshape", ["patches", "to_seq"], ["seq"]),
        n("Transpose", ["seq"], ["tokens"], perm=[0, 2, 1]),
        n("Reshape", ["tokens", "to_grid"], ["grid"]),
        n("Slice", ["grid", "starts", "ends", "axes", "steps"], ["sub"]),
        n("Reshape", ["sub", "q_seq"], ["q_tokens"]),
        n("MatMul", ["q_tokens", "wq"], ["q"]),
        n("Reshape", ["q", "q_heads"], ["q4"]),
        n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["tokens", "wk"], ["k"]),
        n("Reshape", ["k", "kv_heads"], ["k4"]),
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("MatMul", ["tokens", "wv"], ["v"]),
        n("Reshape", ["v", "kv_heads"], ["v4"]),
        n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["scores"]),
        n("Mul", ["scores", "scale"], ["scaled"]),
        n("Softmax", ["scaled"], ["weights"], axis=-1),
        n("MatMul", ["weights", "vt"], ["attended"]),
        n("Transpose", ["attended"], ["by_token"], perm=[0, 2, 1, 3]),
        n("Reshape", ["by_token", "merged"], ["heads_merged"]),
        n("MatMul", ["heads_merged", "wp"], ["projected"]),
        n("Add", ["projected", "bp"], ["out_tokens"]),
        n("ReduceMean", ["out_tokens"], ["pooled"], axes=[1], keepdims=0),
        n("Gemm", ["pooled", "fc", "fc_b"], ["logits"]),
    ]
    return model_of(nodes, [info("image", [1, 3, 16, 16])], [info("logits", [1, CLASSES])],
                    inits)


def layers_of(model: object) -> list[LayerInfo]:
    from onnxcam.exporter.frontends.onnx import prepare

    return prepare(model, "nchw", None, 17).layers  # type: ignore[arg-type]


def test_subsampled_tokens_get_their_grid_and_attention_is_never_the_default() -> None:
    layers = {layer.tensor: layer for layer in layers_of(subsampling_attention())}
    assert layers["tokens"].grid == TokenGrid(0, 4, 4)
    assert layers["out_tokens"].grid == TokenGrid(0, 2, 2)  # every other row and column
    for name in ("qt", "kt", "vt", "scores", "scaled", "weights", "attended", "by_token",
                 "heads_merged"):
        assert layers[name].attention, name
    for name in ("tokens", "projected", "out_tokens"):
        assert not layers[name].attention, name
    # before: the [1, 4, 2, 4] 'by_token', read as 4 channels of a 2x4 map
    assert default_layer(list(layers.values())).tensor == "out_tokens"
    # before: refused with "Grad-CAM needs a 4-D map"
    assert choose_layers(list(layers.values()), "out_tokens")[0].tensor == "out_tokens"


def reference_map(image: np.ndarray, target: int) -> np.ndarray:
    """Grad-CAM on the 2x2 output tokens in float64: the head is a mean over 4 tokens
    and a Gemm, so d logit / d token = fc[:, target] / 4 at every token."""
    w = {k: v.astype(np.float64) for k, v in WEIGHTS.items()}
    x = image.astype(np.float64).transpose(2, 0, 1)  # preprocess "none": raw 0..255, NCHW
    blocks = x.reshape(3, 4, 4, 4, 4).transpose(1, 3, 0, 2, 4).reshape(16, -1)
    tokens = blocks @ w["patch"].reshape(CHANNELS, -1).T  # [16, C], row by row
    queries = tokens.reshape(4, 4, CHANNELS)[::2, ::2].reshape(4, CHANNELS)
    d = CHANNELS // HEADS
    q = (queries @ w["wq"]).reshape(4, HEADS, d).transpose(1, 0, 2)
    k = (tokens @ w["wk"]).reshape(16, HEADS, d).transpose(1, 0, 2)
    v = (tokens @ w["wv"]).reshape(16, HEADS, d).transpose(1, 0, 2)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    merged = (weights @ v).transpose(1, 0, 2).reshape(4, CHANNELS)
    out = merged @ w["wp"] + w["bp"]  # [4, C]
    acts = out.T.reshape(1, CHANNELS, 2, 2)
    grads = np.broadcast_to((w["fc"][:, target] / 4)[None, :, None, None], acts.shape)
    return ref_gradcam(acts, grads)[0]


def test_subsampled_tokens_explain_as_worked_out(tmp_path: Path) -> None:
    import onnxcam

    bundle = tmp_path / "levit_like.cam.onnx"
    onnxcam.export(subsampling_attention(), bundle, preprocess="none")
    images = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    targets = [0, 2]
    got = onnxcam.Explainer(bundle, device="cpu").explain(images, targets).raw
    want = np.stack([reference_map(image, t) for image, t in zip(images, targets)])
    assert_maps_close(got, want, rtol=1e-4)
    assert want.max() > 0


# --------------------------------------------------------------------------- blocks, by hand


GRID = TokenGrid(0, 4, 4)


def tokens(name: str, op: str, shape: tuple[int, ...], source: str | None,
           grid: TokenGrid | None = GRID, role: str = "other") -> LayerInfo:
    return LayerInfo(name, op, shape, role, source, name, grid=grid)


def block(prefix: str, source: str, bias_role: str = "other") -> list[LayerInfo]:
    """A pre-norm block on 16 tokens: norm1, q (MatMul + bias Add), attention, residual
    sum, norm2, MLP, residual sum."""
    c = (1, 16, 64)
    return [
        tokens(f"{prefix}.norm1", "LayerNormalization", c, source),
        tokens(f"{prefix}.q", "MatMul", c, f"{prefix}.norm1"),
        tokens(f"{prefix}.q_bias", "Add", c, f"{prefix}.q", role=bias_role),
        tokens(f"{prefix}.softmax", "Softmax", (1, 4, 16, 16), f"{prefix}.q_bias", grid=None),
        tokens(f"{prefix}.add1", "Add", c, source, role="merge"),
        tokens(f"{prefix}.norm2", "LayerNormalization", c, f"{prefix}.add1"),
        tokens(f"{prefix}.add2", "Add", c, f"{prefix}.add1", role="merge"),
    ]


def test_a_linear_bias_is_no_residual_sum() -> None:
    """PVT's last block: the query's bias Add lies between norm1 and the Softmax."""
    layers = [tokens("embed", "Add", (1, 16, 64), None, role="merge"),
              *block("b0", "embed"), *block("b1", "b0.add2"),
              tokens("norm", "LayerNormalization", (1, 16, 64), "b1.add2"),
              tokens("pool", "ReduceMean", (1, 64), "norm", grid=None)]
    assert default_layer(layers).name == "b1.norm1"  # before: b1.norm2
    # a sum of two branches of that shape there would start the block
    merged = [*layers[:10], tokens("b1.q_bias", "Add", (1, 16, 64), "b1.q", role="merge"),
              *layers[11:]]
    assert default_layer(merged).name == "b1.norm2"


def test_class_attention_blocks_give_way_to_the_last_block_on_the_grid() -> None:
    """CaiT: after the blocks on the grid's 16 tokens, class-attention blocks update
    the class token alone (1 query over 17 keys); the final norm reads all 17."""
    cls = (1, 1, 64)
    layers = [tokens("embed", "Add", (1, 16, 64), None, role="merge"),
              *block("b0", "embed"), *block("b1", "b0.add2"),
              tokens("cat", "Concat", (1, 17, 64), "b1.add2", grid=TokenGrid(1, 4, 4)),
              tokens("ca.norm1", "LayerNormalization", (1, 17, 64), "cat",
                     grid=TokenGrid(1, 4, 4)),
              tokens("ca.softmax", "Softmax", (1, 4, 1, 17), "ca.norm1", grid=None),
              tokens("ca.add1", "Add", cls, "ca.softmax", grid=None, role="merge"),
              tokens("cat2", "Concat", (1, 17, 64), "ca.add1", grid=TokenGrid(1, 4, 4)),
              tokens("norm", "LayerNormalization", (1, 17, 64), "cat2",
                     grid=TokenGrid(1, 4, 4)),
              tokens("cls", "Gather", (1, 64), "norm", grid=None)]
    # before: the final norm, whose map is empty (the head reads the class token only)
    assert default_layer(layers).name == "b1.norm1"


@pytest.mark.parametrize(("convs", "shape", "grid"), [
    ([(14, 14)], (1, 197, 8), TokenGrid(1, 14, 14)),  # ViT: class token + patches
    ([(14, 14)], (1, 49, 8), TokenGrid(0, 7, 7)),  # LeViT: every other row and column
    ([(14, 14)], (1, 16, 8), TokenGrid(0, 4, 4)),  # and again: 7 -> 4
    ([(14, 10)], (1, 35, 8), TokenGrid(0, 7, 5)),  # not square: ceil(14/2) x ceil(10/2)
    ([(7, 7)], (1, 9, 8), TokenGrid(0, 3, 3)),  # pooled by 2: floor, after ceil(7/2)=4 fails
    ([(56, 56), (7, 7)], (1, 3136, 8), TokenGrid(0, 56, 56)),  # PVT: past its reduction conv
    ([(14, 14)], (1, 51, 8), None),  # 49 + 2 leading: subsampled grids have none
    ([(14, 14)], (2, 196, 8), None),  # heads or windows first
])
def test_token_grids(convs: list[tuple[int, int]], shape: tuple[int, ...],
                     grid: TokenGrid | None) -> None:
    grids = TokenGrids()
    for height, width in convs:
        grids.see("Conv", (1, 8, height, width))
    assert grids.grid(shape) == grid

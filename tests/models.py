"""Small deterministic Keras and ONNX image classifiers shared by the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import keras

OPSET = 17
IR_VERSION = 8


# -- Keras helpers --------------------------------------------------------------------------


# The labels of the CNN bundle the tests share (``cnn_bundle`` in conftest.py).
CNN_LABELS = ["cat", "dog", "fox", "owl", "yak"]
FINDINGS = 14  # a chest X-ray model's multi-label head (ChestX-ray14)
# scikit-image's colour photos, the typical inputs that multi-label heads are spread on.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field")

def _keras() -> Any:
    import keras

    return keras


def _sublayers(model: Any) -> list[Any]:
    """Every layer of ``model``, descending into nested models."""
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_sublayers(layer))
    return layers


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> keras.Model:
    """Give every BatchNormalization layer (nested ones too) non-identity statistics."""
    keras = _keras()
    rng = np.random.default_rng(seed)
    for layer in _sublayers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        shape = tuple(layer.moving_mean.shape)
        layer.moving_mean.assign(rng.normal(0.0, 0.5, shape).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.2, shape).astype("float32"))
    return model


def logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Pre-activation outputs of the model's last Dense layer on ``x``."""
    keras = _keras()
    head = model.layers[-1]
    activation = head.activation
    head.activation = keras.activations.linear
    try:
        return np.asarray(model(x, training=False))
    finally:
        head.activation = activation


def random_input(model: keras.Model, batch: int = 8, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) float32 images shaped like the model's input."""
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, *shape)).astype("float32")


def spread_logits(model: keras.Model, target: float = 1.5, seed: int = 0) -> keras.Model:
    """Scale the last Dense kernel so logits on random [0, 1] inputs have RMS ~``target``."""
    head = model.layers[-1]
    z = logits(model, random_input(model, seed=seed)) - np.asarray(head.bias)
    rms = float(np.sqrt(np.mean(z**2)))
    if rms > 0:
        head.kernel.assign(np.asarray(head.kernel) * (target / rms))
    return model


def _finish(model: keras.Model, seed: int) -> keras.Model:
    randomize_batchnorm(model, seed)
    return spread_logits(model, seed=seed)


# -- Keras builders -------------------------------------------------------------------------


def mnist_cnn(seed: int = 0) -> keras.Model:
    """The classic Keras MNIST CNN as a Sequential on 28x28x1 grey images, 10 classes."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Dropout(0.25),
            L.Conv2D(16, 3, activation="relu", name="conv2"),
            L.MaxPooling2D(2, name="pool2"),
            L.Dropout(0.25),
            L.Flatten(),
            L.Dense(32, activation="relu"),
            L.Dense(10, activation="softmax", name="predictions"),
        ],
        name="mnist_cnn",
    )
    return _finish(model, seed)


def vgg_like(seed: int = 0) -> keras.Model:
    """Two VGG blocks on 32x32x3, 6 classes; last conv is ``block2_conv2``."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3), name="input")
    x = inp
    for block, filters in ((1, 8), (2, 16)):
        for i in (1, 2):
            x = L.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}"
            )(x)
        x = L.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="fc1")(x)
    out = L.Dense(6, activation="softmax", name="predictions")(x)
    return _finish(keras.Model(inp, out, name="vgg_like"), seed)


def _conv_bn(x: Any, filters: int, kernel: int, strides: int, name: str) -> Any:
    L = _keras().layers
    x = L.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    return L.BatchNormalization(name=f"{name}_bn")(x)


def residual_bn(seed: int = 0) -> keras.Model:
    """Small ResNet with BN on 32x32x3, 5 classes; ends in ``block2_add`` -> ``block2_out``."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3), name="input")
    x = L.ReLU(name="stem_relu")(_conv_bn(inp, 8, 3, 2, "stem"))
    for block, filters, strides in ((1, 8, 1), (2, 16, 2)):
        name = f"block{block}"
        y = L.ReLU(name=f"{name}_relu1")(_conv_bn(x, filters, 3, strides, f"{name}_1"))
        y = _conv_bn(y, filters, 3, 1, f"{name}_2")
        shortcut = x if strides == 1 else _conv_bn(x, filters, 1, strides, f"{name}_short")
        x = L.Add(name=f"{name}_add")([y, shortcut])
        x = L.ReLU(name=f"{name}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(5, activation="softmax", name="predictions")(x)
    return _finish(keras.Model(inp, out, name="residual_bn"), seed)


def mobilenet_v2_small(seed: int = 0) -> keras.Model:
    """Keras MobileNetV2 (alpha 0.35, untrained) on 64x64x3, 7 classes."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        alpha=0.35, weights=None, input_shape=(64, 64, 3), classes=7
    )
    return _finish(model, seed)


def densenet121_small(seed: int = 0) -> keras.Model:
    """Keras DenseNet121 (untrained) on 32x32x3, 4 classes."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=4)
    return _finish(model, seed)


def nested_transfer(seed: int = 0) -> keras.Model:
    """Functional base model ``base`` (last conv ``base_conv2``) inside a functional head."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    base_in = keras.Input((32, 32, 3), name="base_input")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="base_conv1")(base_in)
    x = L.MaxPooling2D(2, name="base_pool")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="base_conv2")(x)
    base = keras.Model(base_in, x, name="base")
    inp = keras.Input((32, 32, 3), name="input")
    x = L.GlobalAveragePooling2D(name="gap")(base(inp))
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(3, activation="softmax", name="predictions")(x)
    return _finish(keras.Model(inp, out, name="nested_transfer"), seed)


def nested_sequential(seed: int = 0) -> keras.Model:
    """Sequential base ``features`` (last conv ``features_conv2``) inside an outer Sequential."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    features = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            L.Conv2D(8, 3, padding="same", activation="relu", name="features_conv1"),
            L.MaxPooling2D(2, name="features_pool"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="features_conv2"),
        ],
        name="features",
    )
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            features,
            L.GlobalAveragePooling2D(name="gap"),
            L.Dropout(0.2, name="dropout"),
            L.Dense(3, activation="softmax", name="predictions"),
        ],
        name="nested_sequential",
    )
    return _finish(model, seed)


def binary_sigmoid(seed: int = 0) -> keras.Model:
    """Small CNN on 24x24x3 with a single sigmoid output."""
    return _sigmoid_cnn(seed, 1, "predictions", "binary_sigmoid")


def multilabel_sigmoid(seed: int = 0, classes: int = 14) -> keras.Model:
    """Small CNN on 24x24x3 with a ``classes``-way Dense(sigmoid) head, one
    probability per finding as the chest X-ray models have (not in KERAS_BUILDERS)."""
    return _sigmoid_cnn(seed, classes, "findings", "multilabel_sigmoid")


def _sigmoid_cnn(seed: int, classes: int, head: str, name: str) -> keras.Model:
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input((24, 24, 3), name="input")
    x = L.Conv2D(8, 3, activation="relu", name="conv1")(inp)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(classes, activation="sigmoid", name=head)(x)
    return _finish(keras.Model(inp, out, name=name), seed)


def photos(size: int, names: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """scikit-image's bundled colour photos (no download), squashed to ``size``x``size``
    with bilinear resizing: uint8 NHWC, one per name."""
    from PIL import Image
    from skimage import data

    return np.stack([np.asarray(Image.fromarray(getattr(data, name)()).resize(
        (size, size), Image.BILINEAR)) for name in names])


def densenet121_findings(seed: int = 0, size: int = 96, findings: int = FINDINGS,
                         positive: float = 0.4) -> keras.Model:
    """Keras DenseNet121 (untrained) on ``size``x``size``x3 with a chest X-ray style head:
    GlobalAveragePooling2D, Dense(``findings``, sigmoid) named ``findings``; read with
    the ``unit`` preprocessing (x / 255). The head is spread by ``spread_findings`` on
    ``photos`` (not in KERAS_BUILDERS)."""
    keras = _keras()
    L = keras.layers
    keras.utils.set_random_seed(seed)
    base = keras.applications.DenseNet121(weights=None, include_top=False,
                                          input_shape=(size, size, 3))
    x = L.GlobalAveragePooling2D(name="avg_pool")(base.output)
    out = L.Dense(findings, activation="sigmoid", name="findings")(x)
    model = _finish(keras.Model(base.input, out, name="densenet121_findings"), seed)
    typical = photos(size).astype("float32") / 255.0
    return spread_findings(model, typical, positive, seed)


def spread_findings(model: keras.Model, typical: np.ndarray, positive: float = 0.4,
                    seed: int = 0) -> keras.Model:
    """Scale the last Dense kernel so each finding's logit varies by ~1 over the
    ``typical`` model inputs, and set its bias so the logits sit around evenly spread
    offsets, a ``positive`` share of them above 0: findings near 0 flip from image to
    image, as a multi-label model's do."""
    head = model.layers[-1]
    findings = int(head.bias.shape[0])
    z = logits(model, typical) - np.asarray(head.bias)
    scale = 1.0 / max(float(z.std(axis=0).mean()), 1e-6)
    head.kernel.assign(np.asarray(head.kernel) * scale)
    offsets = np.linspace(-1.5, 1.5, findings) + 3.0 * (positive - 0.5)
    offsets = np.random.default_rng(seed).permutation(offsets)
    head.bias.assign((offsets - np.median(z * scale, axis=0)).astype("float32"))
    return model


KERAS_BUILDERS = {
    "mnist_cnn": mnist_cnn,
    "vgg_like": vgg_like,
    "residual_bn": residual_bn,
    "mobilenet_v2_small": mobilenet_v2_small,
    "densenet121_small": densenet121_small,
    "nested_transfer": nested_transfer,
    "nested_sequential": nested_sequential,
    "binary_sigmoid": binary_sigmoid,
}


# -- ONNX builders --------------------------------------------------------------------------


class _Graph:
    """Collects nodes and seeded He-normal initializers for one ONNX graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: Any) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def he(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const(name, self.rng.normal(0.0, np.sqrt(2.0 / fan_in), shape))

    def bias(self, name: str, size: int) -> str:
        return self.const(name, self.rng.normal(0.0, 0.05, (size,)))

    def node(
        self, op: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any
    ) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def conv(self, x: str, cin: int, cout: int, name: str, group: int = 1, kernel: int = 3,
             stride: int = 1) -> str:
        """A Conv with bias (as torch exports a conv with its BatchNorm folded in),
        padded to keep the size at stride 1."""
        fan_in = kernel * kernel * cin // group
        w = self.he(f"{name}.weight", (cout, cin // group, kernel, kernel), fan_in)
        b = self.bias(f"{name}.bias", cout)
        pad = kernel // 2
        strides = {"strides": [stride, stride]} if stride != 1 else {}
        return self.node(
            "Conv",
            [x, w, b],
            name,
            name,
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            group=group,
            **strides,
        )

    def gemm(self, x: str, cin: int, cout: int, output: str) -> str:
        w = self.he("fc.weight", (cout, cin), cin)
        b = self.bias("fc.bias", cout)
        return self.node("Gemm", [x, w, b], output, "fc", transB=1)

    def model(self, name: str, output: str, classes: int, size: int = 16) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="onnxcam-tests",
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _cnn_trunk(g: _Graph) -> str:
    """Conv-Relu-MaxPool-Conv-Relu on ``input``; returns ``feat`` (node ``last_relu``)."""
    x = g.node("Relu", [g.conv("input", 3, 8, "conv1")], "relu1")
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    return g.node("Relu", [g.conv(x, 8, 16, "conv2")], "feat", "last_relu")


def onnx_cnn(seed: int = 0) -> onnx.ModelProto:
    """NCHW [N,3,16,16] CNN: ``last_relu`` -> ``feat`` -> GAP, Gemm, Softmax -> 5 ``probs``."""
    g = _Graph(seed)
    x = g.node("GlobalAveragePool", [_cnn_trunk(g)], "gap")
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.gemm(x, 16, 5, "logits")
    g.node("Softmax", [x], "probs", axis=-1)
    return g.model("onnx_cnn", "probs", 5)


def onnx_multilabel(seed: int = 0, classes: int = 14, squash: bool = True) -> onnx.ModelProto:
    """NCHW [N,3,16,16] CNN: ``feat`` -> GAP, Gemm -> ``classes`` scores, then a
    Sigmoid per class (``probs``); without ``squash`` the Gemm's scores are the output
    (``scores``), as for a model whose sigmoid is applied outside it."""
    g = _Graph(seed)
    x = g.node("GlobalAveragePool", [_cnn_trunk(g)], "gap")
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.gemm(x, 16, classes, "scores")
    if squash:
        return g.model("onnx_multilabel", g.node("Sigmoid", [x], "probs"), classes)
    return g.model("onnx_multilabel", x, classes)


def onnx_skip_head(seed: int = 0, classes: int = 6) -> onnx.ModelProto:
    """``onnx_cnn``'s trunk whose head also reads a tensor from before the layer: ``feat``
    -> Conv, plus a Conv of ``pool1`` (a skip past the layer), then a Reshape to
    [batch, -1] whose batch is read from ``pool1``'s shape (as torch writes
    ``x.view(x.size(0), -1)``), Relu, Gemm to ``classes`` raw scores (multi-label)."""
    g = _Graph(seed)
    feat = _cnn_trunk(g)
    x = g.node("Add", [g.conv(feat, 16, 16, "head_conv"), g.conv("pool1", 8, 16, "skip_conv")],
               "joined")
    batch = g.node("Slice", [g.node("Shape", ["pool1"], "pool1_shape"),
                             _int(g, "zero", [0]), _int(g, "one", [1])], "batch")
    size = g.node("Concat", [batch, _int(g, "rest", [-1])], "flat_shape", axis=0)
    x = g.node("Relu", [g.node("Reshape", [x, size], "flat")], "flat_relu")
    return g.model("onnx_skip_head", g.gemm(x, 16 * 8 * 8, classes, "scores"), classes)


def onnx_segmenter(seed: int = 0, classes: int = 3, size: int = 16) -> onnx.ModelProto:
    """NCHW [N, 3, size, size]: ``onnx_cnn``'s trunk (``feat`` at half size), a 1x1 Conv to
    ``classes`` scores per pixel, and a nearest 2x Resize back to ``size``: per-pixel
    logits [N, classes, size, size] (``scores``), as a segmenter gives them."""
    g = _Graph(seed)
    scores = g.conv(_cnn_trunk(g), 16, classes, "classes", kernel=1)
    scales = g.const("scales", np.array([1, 1, 2, 2], np.float32))
    g.node("Resize", [scores, "", scales], "scores", "upsample", mode="nearest")
    graph = helper.make_graph(
        g.nodes, "onnx_segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                       ["N", classes, size, size])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def _int(g: _Graph, name: str, value: list[int]) -> str:
    g.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    return name


def onnx_wide(seed: int = 0, channels: int = 2048, size: int = 224) -> onnx.ModelProto:
    """A ResNet50-sized target layer on a cheap trunk: a stride-32 conv to ``channels``
    maps of (size/32)², Relu (``feat``), GAP, Gemm to 10 classes; for memory checks of
    methods whose cost grows with the channels (Score-CAM)."""
    g = _Graph(seed)
    x = g.node("Relu", [g.conv("input", 3, channels, "wide", kernel=1, stride=32)], "feat",
               "last_relu")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flat", axis=1)
    return g.model("onnx_wide", g.gemm(x, channels, 10, "logits"), 10, size)


def onnx_unsupported_head(seed: int = 0, op: str = "LRN") -> onnx.ModelProto:
    """``onnx_cnn`` with an op that has no gradient rule in its head, after ``feat``.

    ``op="LRN"`` (default): LRN(size 3, alpha 1) on the ``feat`` map, before GAP.
    ``op="Erf"``: Erf elementwise on the pooled features, after GAP.
    Output is ``probs`` as in ``onnx_cnn``.
    """
    g = _Graph(seed)
    x = _cnn_trunk(g)
    if op == "LRN":
        x = g.node("LRN", [x], "lrn", size=3, alpha=1.0, beta=0.75, bias=1.0)
    x = g.node("GlobalAveragePool", [x], "gap")
    if op == "Erf":
        x = g.node("Erf", [x], "erf")
    elif op != "LRN":
        raise ValueError(f"op must be 'LRN' or 'Erf', not {op!r}")
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.gemm(x, 16, 5, "logits")
    g.node("Softmax", [x], "probs", axis=-1)
    return g.model("onnx_unsupported_head", "probs", 5)


def onnx_residual_nchw(seed: int = 0) -> onnx.ModelProto:
    """NCHW residual block (``block_out``), depthwise Conv + Clip(0, 6) (``dw_out``),
    AveragePool, ReduceMean over H,W, Gemm to 4 raw ``logits`` (no softmax)."""
    g = _Graph(seed)
    stem = g.node("Relu", [g.conv("input", 3, 8, "stem")], "stem_relu")
    y = g.node("Relu", [g.conv(stem, 8, 8, "block_conv1")], "block_relu1")
    y = g.conv(y, 8, 8, "block_conv2")
    x = g.node("Add", [y, stem], "block_add")
    x = g.node("Relu", [x], "block_out", "block_relu")
    x = g.conv(x, 8, 8, "dw", group=8)
    lo, hi = g.const("clip_min", np.float32(0.0)), g.const("clip_max", np.float32(6.0))
    x = g.node("Clip", [x, lo, hi], "dw_out", "relu6")
    x = g.node("AveragePool", [x], "avgpool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("ReduceMean", [x], "pooled", axes=[2, 3], keepdims=0)
    g.gemm(x, 8, 4, "logits")
    return g.model("onnx_residual_nchw", "logits", 4)


def _relu6(g: _Graph, x: str, name: str) -> str:
    if "relu6.min" not in {i.name for i in g.inits}:
        g.const("relu6.min", np.float32(0.0))
        g.const("relu6.max", np.float32(6.0))
    return g.node("Clip", [x, "relu6.min", "relu6.max"], name)


def _classifier(g: _Graph, x: str, channels: int, classes: int) -> str:
    x = g.node("GlobalAveragePool", [x], "avgpool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    return g.gemm(x, channels, classes, "logits")


def torch_resnet18(seed: int = 0, size: int = 32, width: int = 4,
                   classes: int = 6) -> onnx.ModelProto:
    """torchvision's ResNet-18 as torch.onnx exports it (BatchNorm folded into Conv,
    NCHW), at ``width`` base channels: 7x7/2 stem, MaxPool 3x3/2 pad 1, four stages
    of two BasicBlocks with residual Adds (1x1/2 downsampling), GAP, Flatten, Gemm.
    Stage outputs are ``layer1`` ... ``layer4``."""
    g = _Graph(seed)
    x = g.node("Relu", [g.conv("input", 3, width, "conv1", kernel=7, stride=2)], "relu")
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    channels = width
    for stage in range(1, 5):
        out = width * 2 ** (stage - 1)
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"layer{stage}.{block}"
            y = g.node("Relu", [g.conv(x, channels, out, f"{name}.conv1", stride=stride)],
                       f"{name}.relu1")
            y = g.conv(y, out, out, f"{name}.conv2")
            shortcut = x if stride == 1 and channels == out else g.conv(
                x, channels, out, f"{name}.downsample", kernel=1, stride=stride)
            x = g.node("Add", [y, shortcut], f"{name}.add")
            last = f"layer{stage}" if block == 1 else f"{name}.out"
            x = g.node("Relu", [x], last, last)
            channels = out
    _classifier(g, x, channels, classes)
    return g.model("torch_resnet18", "logits", classes, size)


def torch_mobilenet_v2(seed: int = 0, size: int = 32, classes: int = 6) -> onnx.ModelProto:
    """torchvision's MobileNetV2 as torch.onnx exports it, narrowed: 3x3/2 stem with
    Clip(0, 6) (ReLU6), inverted residual blocks (1x1 expand, depthwise 3x3 Conv with
    group = channels, 1x1 project, residual Add at stride 1), a 1x1 head conv
    (``features``), GAP, Flatten, Gemm."""
    g = _Graph(seed)
    x = _relu6(g, g.conv("input", 3, 8, "stem", stride=2), "stem.relu6")
    channels = 8
    # (expansion, output channels, stride) per block
    for i, (expand, out, stride) in enumerate(((1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2))):
        name = f"block{i}"
        hidden = channels * expand
        y = x
        if expand != 1:
            y = _relu6(g, g.conv(y, channels, hidden, f"{name}.expand", kernel=1),
                       f"{name}.expand_relu6")
        y = _relu6(g, g.conv(y, hidden, hidden, f"{name}.dw", group=hidden, stride=stride),
                   f"{name}.dw_relu6")
        y = g.conv(y, hidden, out, f"{name}.project", kernel=1)
        x = g.node("Add", [y, x], f"{name}.add") if stride == 1 and channels == out else y
        channels = out
    x = _relu6(g, g.conv(x, channels, 32, "head", kernel=1), "features")
    _classifier(g, x, 32, classes)
    return g.model("torch_mobilenet_v2", "logits", classes, size)


# -- torch builders (torch.nn.Module; torch and torchvision imported lazily) ------------


def torch_findings(arch: str = "resnet18", size: int = 128, findings: int = FINDINGS,
                   seed: int = 0, positive: float = 0.4) -> Any:
    """torchvision's ``arch`` (resnet18 or densenet121, untrained) with a ``findings``-way
    Linear head returning plain logits, the sigmoid applied outside as torch users
    write it; read with the ``torch`` preprocessing. Every tensor is perturbed and
    BatchNorm calibrated (``zoo.ZooModel.model``), then the head is spread on
    ``photos`` as ``spread_findings`` does for Keras. In eval mode."""
    import torch
    import torchvision
    import zoo

    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=findings)
    model = zoo.calibrate(zoo.perturb(model, seed), size).eval()
    head = model.fc if arch.startswith("resnet") else model.classifier
    with torch.no_grad():
        z = (model(zoo.torch_input(photos(size))) - head.bias).numpy()
        scale = 1.0 / max(float(z.std(axis=0).mean()), 1e-6)
        offsets = np.linspace(-1.5, 1.5, findings) + 3.0 * (positive - 0.5)
        offsets = np.random.default_rng(seed).permutation(offsets)
        if findings == 1:  # a binary head: its one logit around 0, either side per image
            offsets = np.zeros(1)
        head.weight.mul_(scale)
        head.bias.copy_(torch.from_numpy((offsets - np.median(z * scale, axis=0))
                                         .astype(np.float32)))
    return model


ONNX_BUILDERS = {
    "onnx_cnn": onnx_cnn,
    "onnx_unsupported_head": onnx_unsupported_head,
    "onnx_residual_nchw": onnx_residual_nchw,
    "torch_resnet18": torch_resnet18,
    "torch_mobilenet_v2": torch_mobilenet_v2,
}

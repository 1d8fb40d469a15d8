"""The default target layer (issue 10, item 5) on torchvision's zoo and keras.applications.

Rule: the last map with a real spatial extent (over 1x1) that the classifier pools
or flattens; not a class-score map, nothing after pooling; for transformers the
last block's first LayerNorm. The torchvision families are held to pytorch-grad-cam's
usual layer in ``test_torch_zoo.py``, on the exports it shares with the map tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from onnxcam.exporter.layers import LayerInfo, default_layer

# keras.applications at 64x64, the smallest size whose last stage is over 1x1.
KERAS_DEFAULTS = {
    "ResNet50": "conv5_block3_out",  # as before
    "DenseNet121": "relu",  # was conv5_block16_concat: the rule keeps the final bn + relu
    "VGG16": "block5_pool",  # was block5_conv3: the map Flatten reads
    "MobileNetV2": "out_relu",  # was Conv_1: the final BN + ReLU6 are kept
}


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERAS_DEFAULTS))
def test_keras_applications_defaults(name: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from onnxcam.exporter.frontends.keras import feeding_output, flatten

    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    flat, _ = flatten(model)
    assert default_layer(feeding_output(flat)).name == KERAS_DEFAULTS[name]


# --------------------------------------------------------------------------- the rule, by hand


def chain(*specs: tuple[str, str, tuple[int, ...]], roles: dict[str, str] | None = None
          ) -> list[LayerInfo]:
    """Layers in a line, each reading the one before: (name, op, shape at batch 1)."""
    from onnxcam.exporter.frontends.onnx import ROLES

    layers, source = [], None
    for name, op, shape in specs:
        layers.append(LayerInfo(name, op, shape, ROLES.get(op, "other"), source, name))
        source = name
    return layers


def test_class_score_map_gives_way_to_the_map_it_reads() -> None:
    layers = chain(("fire", "Concat", (1, 512, 3, 3)), ("drop", "Dropout", (1, 512, 3, 3)),
                   ("scores", "Conv", (1, 10, 3, 3)), ("relu", "Relu", (1, 10, 3, 3)),
                   ("gap", "GlobalAveragePool", (1, 10, 1, 1)), ("flat", "Flatten", (1, 10)))
    assert default_layer(layers).name == "fire"
    # the same convolution with another channel count is an ordinary last map
    layers[2] = LayerInfo("scores", "Conv", (1, 16, 3, 3), "conv", "drop", "scores")
    layers[3] = LayerInfo("relu", "Relu", (1, 16, 3, 3), "activation", "scores", "relu")
    assert default_layer(layers).name == "relu"


def test_nothing_after_pooling_and_no_windows() -> None:
    layers = chain(("stage", "Add", (1, 768, 2, 2)), ("gap", "GlobalAveragePool", (1, 768, 1, 1)),
                   ("to_nhwc", "Transpose", (1, 1, 1, 768)),
                   ("norm", "LayerNormalization", (1, 1, 1, 768)),
                   ("to_nchw", "Transpose", (1, 768, 1, 1)), ("flat", "Flatten", (1, 768)),
                   ("fc", "Gemm", (1, 10)))
    assert default_layer(layers).name == "stage"
    # attention windows [N * windows, heads, tokens, tokens] are not maps of the image
    windows = chain(("map", "Relu", (1, 8, 4, 4)), ("attn", "Softmax", (4, 2, 4, 4)),
                    ("flat", "Flatten", (1, 128)), ("fc", "Gemm", (1, 10)))
    assert default_layer(windows).name == "map"


def test_adaptive_pool_that_enlarges_gives_way_but_a_shrinking_pool_stays() -> None:
    grown = chain(("pool", "MaxPool", (1, 256, 3, 3)), ("t", "Transpose", (3, 3, 1, 256)),
                  ("g", "GatherND", (6, 1, 6, 1, 1, 256)), ("mean", "ReduceMean", (1, 256, 6, 6)),
                  ("flat", "Reshape", (1, 9216)), ("fc", "Gemm", (1, 10)))
    assert default_layer(grown).name == "pool"
    shrunk = chain(("relu6", "Clip", (1, 8, 16, 16)), ("avg", "AveragePool", (1, 8, 8, 8)),
                   ("mean", "ReduceMean", (1, 8)), ("fc", "Gemm", (1, 4)))
    assert default_layer(shrunk).name == "avg"


def test_all_maps_1x1_gives_the_last_map() -> None:
    layers = chain(("conv", "Conv", (1, 8, 1, 1)), ("relu", "Relu", (1, 8, 1, 1)),
                   ("flat", "Flatten", (1, 8)), ("fc", "Gemm", (1, 3)))
    assert default_layer(layers).name == "relu"


def test_a_map_made_by_views_alone_stays() -> None:
    """MaxViT's last block adds its residual on grid-partitioned tokens, then views
    them back into the image's map: that map is the one the classifier pools."""
    layers = chain(("add", "Add", (1, 4, 4, 8)), ("swap", "Transpose", (1, 4, 4, 8)),
                   ("split", "Reshape", (1, 2, 2, 2, 2, 8)),
                   ("order", "Transpose", (1, 8, 2, 2, 2, 2)), ("map", "Reshape", (1, 8, 4, 4)),
                   ("gap", "GlobalAveragePool", (1, 8, 1, 1)), ("flat", "Flatten", (1, 8)),
                   ("fc", "Gemm", (1, 10)))
    assert default_layer(layers).name == "map"


# --------------------------------------------------------------------------- segmenters


def test_a_segmenter_ends_where_it_first_upsamples_a_map() -> None:
    """DeepLabV3's shape: the image-pooling branch's Resize broadcasts a 1x1 map (no
    upsampling); the head's class scores are upsampled to the image. The default is
    the map the class-score convolution reads."""
    layers = chain(("block", "Relu", (1, 64, 8, 8)), ("pool", "GlobalAveragePool", (1, 64, 1, 1)),
                   ("pool_relu", "Relu", (1, 64, 1, 1)), ("broadcast", "Resize", (1, 64, 8, 8)),
                   ("concat", "Concat", (1, 128, 8, 8)), ("head", "Relu", (1, 32, 8, 8)),
                   ("scores", "Conv", (1, 4, 8, 8)), ("up", "Resize", (1, 4, 64, 64)))
    assert default_layer(layers).name == "head"


def test_a_unet_defaults_to_its_bottleneck() -> None:
    """Keras (NHWC): the first upsampling is the transposed convolution after the
    bottleneck; the decoder's maps after it are larger and not the default."""
    layers = chain(("enc", "Conv2D", (None, 16, 16, 8)), ("down", "MaxPooling2D", (None, 8, 8, 8)),
                   ("bottleneck", "Conv2D", (None, 8, 8, 16)),
                   ("up", "Conv2DTranspose", (None, 16, 16, 12)),
                   ("dec", "Conv2D", (None, 16, 16, 12)), ("classes", "Conv2D", (None, 16, 16, 4)))
    assert default_layer(layers).name == "bottleneck"


def test_a_segmenter_that_never_upsamples_defaults_to_what_its_scores_read() -> None:
    layers = chain(("conv", "Conv", (1, 4, 8, 8)), ("relu", "Relu", (1, 4, 8, 8)),
                   ("classes", "Conv", (1, 3, 8, 8)))
    assert default_layer(layers).name == "relu"


# name: what the default is: a module path it is the output of, or its name
SEGMENTER_DEFAULTS = {
    "fcn": ("modules", "classifier.2"),  # FCNHead's ReLU, before Dropout and the scores
    "deeplabv3": ("modules", "classifier.3"),  # DeepLabHead's ReLU, after ASPP
    "lraspp": ("name", "/classifier/Mul"),  # the high branch gated by its pooled scale
    "unet": ("name", "bottleneck"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SEGMENTER_DEFAULTS))
def test_segmenters_default_to_the_map_before_upsampling(name: str, tmp_path: Path) -> None:
    """torchvision's three through the legacy exporter's file, the Keras U-Net saved."""
    from segmenters import torch_onnx, torchvision_segmenter, unet

    from onnxcam.exporter.pipeline import list_layers

    if name == "unet":
        pytest.importorskip("tensorflow")
        path = tmp_path / "unet.keras"
        unet(softmax=True).save(path)
    else:
        pytest.importorskip("torchvision")
        path = torch_onnx(torchvision_segmenter(name), "legacy", tmp_path)
    chosen = default_layer(list_layers(path))
    kind, want = SEGMENTER_DEFAULTS[name]
    assert (want in chosen.modules) if kind == "modules" else chosen.name == want

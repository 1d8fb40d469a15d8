"""Classifiers whose input preprocessing is known from their name: the families of
``keras.applications``, each with its ``preprocess_input`` as a ``--preprocess`` mode.

A bundle embeds the preprocessing, so the wrong mode gives confident wrong answers
(a MobileNetV2 fed ``unit`` called a coffee cup a cat). Keras names each application
model after its family, and transfer-learning models keep that name on the nested
base, which is what is looked for here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # as keras.applications spells the constructor
    preprocess: str  # the --preprocess mode that equals its preprocess_input
    # Families whose preprocess_input passes pixels through because the model rescales
    # them itself; only true while the model still holds that Rescaling layer.
    rescales_inside: bool = False


# Model names as keras.applications sets them (Keras 3), by family.
KERAS_APPLICATIONS: tuple[tuple[re.Pattern[str], Family], ...] = tuple(
    (re.compile(pattern), family) for pattern, family in (
        (r"vgg1[69]$", Family("VGG16/VGG19", "caffe")),
        (r"resnet(50|101|152)$", Family("ResNet", "caffe")),
        (r"resnet(50|101|152)v2$", Family("ResNetV2", "tf")),
        (r"mobilenet_\d\.\d\d_\d+$", Family("MobileNet", "tf")),
        (r"mobilenetv2_\d\.\d\d_\d+$", Family("MobileNetV2", "tf")),
        (r"inception_v3$", Family("InceptionV3", "tf")),
        (r"inception_resnet_v2$", Family("InceptionResNetV2", "tf")),
        (r"xception$", Family("Xception", "tf")),
        (r"nasnet_(mobile|large)$|NASNet$", Family("NASNet", "tf")),
        (r"densenet(121|169|201)$", Family("DenseNet", "torch")),
        (r"efficientnetb\d$", Family("EfficientNet", "none", rescales_inside=True)),
        (r"efficientnetv2-(b\d|s|m|l)$", Family("EfficientNetV2", "none", rescales_inside=True)),
        (r"convnext_(tiny|small|base|large|xlarge)$", Family("ConvNeXt", "none",
                                                              rescales_inside=True)),
        (r"MobileNetV3(Small|Large)$", Family("MobileNetV3", "none", rescales_inside=True)),
    ))


def keras_family(model_names: list[str], has_rescaling: bool) -> Family | None:
    """The family of the first of ``model_names`` (the model's own name, then those of
    the models nested in it) that keras.applications gives. None when none is one, and
    when the Rescaling layers say the preprocessing was changed: a family that rescales
    inside with none left (built with include_preprocessing=False), or one that does
    not with one added (the user's own scaling in front)."""
    for name in model_names:
        for pattern, family in KERAS_APPLICATIONS:
            if pattern.match(name):
                return family if family.rescales_inside == has_rescaling else None
    return None

"""Every keras.applications family as a bundle, held against TF GradientTape (issue 10).

One smallest member per family, ``weights=None``, 10 classes, its weights perturbed
so that no two tensors are equal (BatchNorm moving statistics included). Each is
exported with verification on and analytic gradients at the default layer, and the
bundle's Grad-CAM map is held against a Grad-CAM computed here with GradientTape on
the Keras model itself (pre-softmax logits). Each is also exported with
``input_gradients=True, guided=True`` (issue 12, item 3).

Sizes: the smallest input at which the last stage is over 1x1 (64 for the stride-32
families; 71 for Xception, its minimum; 107 for the Inceptions, whose minimum 75 gives
1x1). At 32 the default layer falls mid-network (a ZeroPadding2D, conv4), which is
not the map anyone would explain.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxcam

pytestmark = [pytest.mark.tf, pytest.mark.slow]
logger = logging.getLogger(__name__)

CLASSES = 10
TARGETS = np.array([3, 7], np.int64)
MAP_ATOL = 2e-3  # min-max normalised maps, bundle against GradientTape
# The default layer's input to the classifier's global pool (or Flatten): for models
# whose layer there has an auto-generated name (activation_611), not stable to pin.
POOLED = "the map the classifier pools"


@dataclass(frozen=True)
class Family:
    size: int
    default: str  # the expected default layer, or POOLED


FAMILIES = {
    "ConvNeXtTiny": Family(64, POOLED),
    "DenseNet121": Family(64, "relu"),
    "EfficientNetB0": Family(64, "top_activation"),
    "EfficientNetV2B0": Family(64, "top_activation"),
    "InceptionResNetV2": Family(107, "conv_7b_ac"),
    "InceptionV3": Family(107, "mixed10"),
    "MobileNet": Family(64, "conv_pw_13_relu"),
    "MobileNetV2": Family(64, "out_relu"),
    "MobileNetV3Small": Family(64, POOLED),
    "NASNetMobile": Family(64, POOLED),
    "ResNet50": Family(64, "conv5_block3_out"),
    "ResNet50V2": Family(64, "post_relu"),
    "VGG16": Family(64, "block5_pool"),
    "Xception": Family(71, "block14_sepconv2_act"),
}

# Cases that fail today, with the first line of the real error; fixes flip them.
GRADCAM_XFAIL: dict[str, str] = {}
GUIDED_XFAIL: dict[str, str] = {}
# The guided export converts the model a second time; for the slowest conversions, and
# for the plain conv-ReLU stacks (VGG16, ResNet50) whose ops DenseNet121 and the
# MobileNet and EfficientNet cases cover, it is left out to keep the full suite in its
# 30 minutes.
GUIDED_SKIPPED = {"ConvNeXtTiny", "InceptionResNetV2", "InceptionV3", "NASNetMobile",
                  "ResNet50", "ResNet50V2", "VGG16", "Xception"}


def cases(xfails: dict[str, str], skipped: set[str] | None = None) -> list[Any]:
    skipped = skipped or set()

    def marks(name: str) -> list[Any]:
        if name in xfails:
            return [pytest.mark.xfail(strict=True, reason=xfails[name])]
        return []

    return [pytest.param(name, marks=marks(name))
            for name in sorted(FAMILIES) if name not in skipped]


# --------------------------------------------------------------------------- models


def perturb(model: Any, seed: int) -> None:
    """Deterministic noise on every float weight; variances scaled, so they stay positive."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = np.asarray(weight.numpy())
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if "variance" in weight.path:
            value = value * rng.uniform(0.5, 1.5, value.shape)
        elif "layer_scale" in weight.path:
            # ConvNeXt's start at 1e-6, all equal; trained ones are of order 0.1 to 1.
            # At 1e-6 the blocks vanish and the 2x2 map is float32 cancellation.
            value = rng.uniform(0.1, 1.0, value.shape)
        else:
            scale = float(value.std()) or 0.05
            value = value + rng.normal(0.0, 0.1 * scale, value.shape)
        weight.assign(value.astype(weight.dtype))


def distinct_tensors(model: Any) -> bool:
    unique = {w.path: w for w in model.weights}.values()  # a variable may be listed twice
    tensors = [np.asarray(w.numpy()) for w in unique
               if np.issubdtype(np.asarray(w.numpy()).dtype, np.floating)]
    return len({t.tobytes() for t in tensors}) == len(tensors)


def output_of(model: Any, name: str) -> Any:
    """The output of the layer, or the operation (ConvNeXt's last residual add), ``name``."""
    return next(op for op in model.operations if op.name == name).output


def pooled_input(model: Any) -> str:
    """The layer whose output the classifier's global pool reads (the last one:
    squeeze-and-excitation blocks pool too), or else its Flatten."""
    import keras

    pools = [layer for layer in model.layers if isinstance(
        layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))]
    # without a global pool (VGG), the Flatten; MobileNetV3 flattens its 1x1 logits after it
    pool = pools[-1] if pools else next(layer for layer in model.layers
                                        if isinstance(layer, keras.layers.Flatten))
    return pool.input._keras_history.operation.name


@dataclass
class Zoo:
    """Each family built, perturbed and saved once per session; exports cached."""

    folder: Path
    models: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    exports: dict[tuple[str, bool], tuple[onnxcam.ExportResult, float]] = field(
        default_factory=dict)

    def model(self, name: str) -> Any:
        if name not in self.models:
            import keras

            size = FAMILIES[name].size
            model = getattr(keras.applications, name)(
                weights=None, input_shape=(size, size, 3), classes=CLASSES)
            perturb(model, seed=sorted(FAMILIES).index(name))
            path = self.folder / f"{name}.keras"
            model.save(path)
            self.models[name], self.sources[name] = model, path
        return self.models[name]

    def export(self, name: str, guided: bool = False) -> tuple[onnxcam.ExportResult, float]:
        if (name, guided) not in self.exports:
            self.model(name)
            out = self.folder / f"{name}{'_guided' if guided else ''}.bundle.onnx"
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            result = (onnxcam.export(self.sources[name], out, preprocess="unit", verify=True,
                                     input_gradients=True, guided=True)
                      if guided else
                      onnxcam.export(self.sources[name], out, preprocess="unit", verify=True,
                                     gradient="analytic"))
            seconds = time.perf_counter() - start
            # ru_maxrss only grows: the delta is how far this export raised the peak (KiB)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            logger.info("%s guided=%s export %.1f s, peak RSS +%d MiB (process peak %d MiB)",
                        name, guided, seconds, grown // 1024,
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
            self.exports[name, guided] = result, seconds
        return self.exports[name, guided]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    pytest.importorskip("tensorflow")
    return Zoo(tmp_path_factory.mktemp("keras_zoo"))


# --------------------------------------------------------------------------- reference


def images(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, (len(TARGETS), size, size, 3),
                                                dtype=np.uint8)


def normalised(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return (maps - low) / np.where(span > 0, span, 1.0)


def tape_gradcam(model: Any, layer: str, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Grad-CAM of ``layer`` for ``targets`` by GradientTape, on pre-softmax logits."""
    import keras
    import tensorflow as tf

    head = model.layers[-1]
    assert head.activation.__name__ == "softmax", head.activation
    probe = keras.Model(model.inputs, [output_of(model, layer), model.outputs[0]])
    head.activation = keras.activations.linear  # the bundle removes the terminal softmax
    try:
        with tf.GradientTape() as tape:
            activations, logits = probe(tf.constant(x), training=False)
            picked = tf.gather(logits, targets, batch_dims=1)
        gradients = tape.gradient(picked, activations).numpy()
    finally:
        head.activation = keras.activations.softmax
    assert not np.allclose(logits.numpy().sum(axis=1), 1.0), "softmax still on"
    weights = gradients.mean(axis=(1, 2))
    return np.maximum(np.einsum("nhwc,nc->nhw", activations.numpy(), weights), 0.0)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", cases(GRADCAM_XFAIL))
def test_gradcam_matches_gradient_tape(zoo: Zoo, name: str) -> None:
    model = zoo.model(name)
    assert distinct_tensors(model)
    result, _ = zoo.export(name)
    family = FAMILIES[name]
    expected = pooled_input(model) if family.default == POOLED else family.default
    assert result.info.gradient == "analytic"
    assert result.info.target_layer == expected
    assert output_of(model, expected).shape[1] > 1  # a map, not after the pool
    batch = images(family.size)
    got = onnxcam.Explainer(result.path).explain(list(batch), TARGETS).raw
    want = tape_gradcam(model, expected, batch.astype(np.float32) / 255.0, TARGETS)
    assert got.shape == want.shape
    error = float(np.abs(normalised(got) - normalised(want)).max())
    logger.info("%s map error %.2e against GradientTape", name, error)
    assert error <= MAP_ATOL, f"map error {error:.3e} against GradientTape"


@pytest.mark.parametrize("name", cases(GUIDED_XFAIL, GUIDED_SKIPPED))
def test_input_gradients_guided_export_verifies(zoo: Zoo, name: str) -> None:
    result, _ = zoo.export(name, guided=True)
    assert result.report is not None and result.path.is_file()
    assert result.info.gradient == "analytic" and result.info.input_gradients


def test_a_wrong_input_gradient_rule_is_refused(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ResNet50's stem MaxPool lies below every layer map, so only the input gradients
    cross its rule: a rule that doubles the gradient there must still be refused by
    the norm check and its rounding-scaled tolerance (issue 12, item 3)."""
    from onnxcam.errors import VerificationError
    from onnxcam.exporter.vjp import load_rules

    rules = load_rules()
    real = rules["MaxPool"]

    def doubled(ctx: Any, node: Any, grads: Any) -> Any:
        return [None if g is None else ctx.b.op("Mul", [g, ctx.scalar(2.0)])
                for g in real(ctx, node, grads)]

    zoo.model("ResNet50")
    monkeypatch.setitem(rules, "MaxPool", doubled)
    out = tmp_path / "mutant.bundle.onnx"
    with pytest.raises(VerificationError, match="'input_gradients'.*--no-verify") as refused:
        onnxcam.export(zoo.sources["ResNet50"], out, preprocess="unit",
                       input_gradients=True, guided=True)
    logger.info("doubled MaxPool rule: %s", refused.value)
    assert not out.exists()

"""The gradient methods against TF GradientTape on the Keras test models, and their
batch behaviour, refusals and per-layer maps on ONNX bundles.

TF references are written out here from the methods' definitions: saliency as
keras-vis' ``visualize_saliency`` (max over channels of |d logit / d input|),
guided backprop with a ``tf.custom_gradient`` ReLU, SmoothGrad with the same
seeded noise, integrated gradients with the same midpoint path. Nothing from
``worker.methods`` computes an expected value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from checks import assert_close

from onnxcam.engine import Explainer
from onnxcam.errors import BadMethodError
from onnxcam.exporter import export

GRADIENT_METHODS = ["saliency", "smoothgrad", "guided-backprop", "guided-gradcam",
                    "integrated-gradients"]
OPTIONS = {"samples": 3, "noise": 0.2, "steps": 8, "seed": 11}
BATCH = 3
# DenseNet121 is left out here for time (its input gradients are verified at export).
KERAS_MODELS = ["mnist_cnn", "vgg_like", "residual_bn", "mobilenet_v2_small",
                "nested_transfer", "nested_sequential"]


def per_image_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    for n in range(len(want)):
        assert_close(got[n], want[n], rtol, f"{what}, image {n}")


def midpoints(steps: int) -> np.ndarray:
    return (np.arange(steps) + 0.5) / steps


# ------------------------------------------------------------------------- ONNX bundles


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gradient_methods")


@pytest.fixture(scope="module")
def resnet_source(folder: Path) -> Path:
    path = folder / "torch_resnet18.onnx"
    onnx.save(models.torch_resnet18(), str(path))
    return path


@pytest.fixture(scope="module")
def resnet_bundle(folder: Path, resnet_source: Path) -> Path:
    out = folder / "resnet.bundle.onnx"
    export(resnet_source, out, layer=["layer3", "layer1", "layer4"], preprocess="torch",
           input_gradients=True, guided=True)
    return out


@pytest.fixture(scope="module")
def resnet(resnet_bundle: Path) -> Explainer:
    return Explainer(resnet_bundle, device="cpu")


def batch(size: int = 32, count: int = BATCH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_a_batch_equals_batches_of_one(resnet: Explainer, method: str) -> None:
    images, targets = batch(), [0, 5, 3]
    whole = resnet.explain(images, targets, method=method, batch_size=BATCH, **OPTIONS)
    ones = resnet.explain(images, targets, method=method, batch_size=1, **OPTIONS)
    assert whole.raw.shape == (BATCH, 32, 32)
    assert whole.input_gradients is not None and ones.input_gradients is not None
    assert whole.input_gradients.shape == (BATCH, 32, 32, 3)
    assert_close(whole.raw, ones.raw, 1e-5, f"{method} maps")
    assert_close(whole.input_gradients, ones.input_gradients, 1e-5, f"{method} images")
    assert_close(whole.heatmaps, ones.heatmaps, 1e-5, f"{method} heatmaps")


def test_saliency_is_the_max_of_the_absolute_input_gradient(resnet: Explainer,
                                                            resnet_bundle: Path) -> None:
    images = batch(seed=1)
    result = resnet.explain(images, method="saliency")
    session = ort.InferenceSession(str(resnet_bundle), providers=["CPUExecutionProvider"])
    (gradients,) = session.run(["input_gradients"], {"image": images,
                                                     "target": result.targets})
    np.testing.assert_allclose(result.raw, np.abs(gradients).max(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(result.input_gradients, gradients, rtol=1e-6)
    assert result.layer_maps == {}


def test_integrated_gradients_are_complete(resnet: Explainer, resnet_source: Path) -> None:
    """sum(IG) ~ logit(x) - logit(0): the path integral adds up to the score change."""
    images = batch(seed=2)
    result = resnet.explain(images, method="integrated-gradients", steps=64)
    assert result.input_gradients is not None
    session = ort.InferenceSession(str(resnet_source), providers=["CPUExecutionProvider"])
    (baseline,) = session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    rows = np.arange(BATCH)
    change = result.logits[rows, result.targets] - baseline[0, result.targets]
    total = result.input_gradients.sum(axis=(1, 2, 3))
    assert_close(total, change, 2e-2, "sum of integrated gradients")


def test_every_layer_map_equals_a_single_layer_bundle(folder: Path, resnet: Explainer,
                                                      resnet_source: Path) -> None:
    images = batch(seed=4)
    for method in ("gradcam", "layercam", "guided-gradcam"):
        several = resnet.explain(images, method=method)
        assert list(several.layer_maps) == ["layer1", "layer3", "layer4"]
        assert_close(several.raw, several.layer_maps["layer3"], 0, f"{method} primary layer")
        for layer in several.layer_maps:
            out = folder / f"single_{layer}.onnx"
            if not out.exists():
                export(resnet_source, out, layer=layer, preprocess="torch", guided=True,
                       verify=False)
            single = Explainer(out, device="cpu").explain(images, method=method)
            assert_close(several.layer_maps[layer], single.raw, 1e-5, f"{method} {layer}")


def test_cam_methods_skip_the_input_gradients(resnet: Explainer, resnet_source: Path,
                                              folder: Path) -> None:
    """Grad-CAM on a bundle with input gradients runs a session pruned of them, with
    the same result as a bundle exported without the flags."""
    plain = folder / "plain.onnx"
    export(resnet_source, plain, layer="layer3", preprocess="torch", verify=False)
    images = batch(seed=5)
    got = resnet.explain(images, method="gradcam")
    want = Explainer(plain, device="cpu").explain(images, method="gradcam")
    assert_close(got.raw, want.raw, 1e-6, "gradcam")
    both = {"input_gradients", "guided_input_gradients"}
    assert {o.name for o in resnet.sessions.session_for(["cam"]).get_outputs()}.isdisjoint(both)
    full = resnet.sessions.session_for(["logits", *both])
    assert both <= {o.name for o in full.get_outputs()}


@pytest.mark.parametrize(("method", "flag"), [("saliency", "--input-gradients"),
                                              ("smoothgrad", "--input-gradients"),
                                              ("integrated-gradients", "--input-gradients"),
                                              ("guided-backprop", "--guided"),
                                              ("guided-gradcam", "--guided")])
def test_methods_name_the_missing_export_flag(folder: Path, resnet_source: Path, method: str,
                                              flag: str) -> None:
    out = folder / "no_flags.onnx"
    if not out.exists():
        export(resnet_source, out, preprocess="torch", verify=False)
    with pytest.raises(BadMethodError, match=flag):
        Explainer(out, device="cpu").explain(batch(), method=method)


# ------------------------------------------------------------------------- TF references


def _tf() -> Any:
    import tensorflow as tf

    return tf


def guided_relu() -> Any:
    tf = _tf()

    @tf.custom_gradient
    def relu(x: Any) -> Any:
        def backward(dy: Any) -> Any:
            return dy * tf.cast(dy > 0, dy.dtype) * tf.cast(x > 0, dy.dtype)

        return tf.nn.relu(x), backward

    return relu


def linear_copy(model: Any, guided: bool) -> Any:
    """A copy of ``model`` whose output layer is linear; with ``guided``, every plain
    ReLU (activation functions and ReLU layers without a cap) uses ``guided_relu``."""
    import keras

    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    copy.set_weights(model.get_weights())
    copy.layers[-1].activation = keras.activations.linear
    if guided:
        relu = guided_relu()
        for layer in models._sublayers(copy):
            if getattr(layer, "activation", None) is keras.activations.relu:
                layer.activation = relu
            elif isinstance(layer, keras.layers.ReLU) and layer.max_value is None:
                layer.call = lambda x, *args, **kwargs: relu(x)
    return copy


def tape_gradients(model: Any) -> Any:
    """(float NHWC inputs, targets) -> d logit[target] / d input, by GradientTape."""
    tf = _tf()

    @tf.function(reduce_retracing=True)
    def gradients(x: Any, targets: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.gather(model(x, training=False), targets, batch_dims=1)
        return tape.gradient(score, x)

    return lambda x, targets: gradients(tf.constant(x, tf.float32),
                                        tf.constant(targets, tf.int64)).numpy()


class KerasCase:
    """One Keras model: its bundle with both input gradients, and TF references."""

    def __init__(self, name: str, folder: Path) -> None:
        import keras

        source = folder / f"{name}.keras"
        models.KERAS_BUILDERS[name]().save(source)
        self.bundle = folder / f"{name}.bundle.onnx"
        export(source, self.bundle, preprocess="unit", input_gradients=True, guided=True,
               verify=False)
        self.explainer = Explainer(self.bundle, device="cpu")
        model = keras.saving.load_model(source, compile=False)
        self.plain = tape_gradients(linear_copy(model, guided=False))
        self.guided = tape_gradients(linear_copy(model, guided=True))
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self.images = np.random.default_rng(7).integers(0, 256, (BATCH, *shape), np.uint8)
        self.x = self.images.astype(np.float32) / np.float32(255.0)  # ``unit`` preprocessing


@pytest.fixture(scope="module", params=KERAS_MODELS)
def keras_case(request: pytest.FixtureRequest, folder: Path) -> KerasCase:
    pytest.importorskip("tensorflow")
    return KerasCase(request.param, folder)


def explain(case: KerasCase, method: str) -> Any:
    result = case.explainer.explain(case.images, None, method=method, **OPTIONS)
    assert result.input_gradients is not None
    return result


@pytest.mark.tf
def test_saliency_matches_gradient_tape(keras_case: KerasCase) -> None:
    result = explain(keras_case, "saliency")
    want = keras_case.plain(keras_case.x, result.targets)
    per_image_close(result.input_gradients, want, 1e-4, "input gradients")
    per_image_close(result.raw, np.abs(want).max(axis=-1), 1e-4, "saliency")


@pytest.mark.tf
def test_guided_backprop_matches_a_custom_gradient_relu(keras_case: KerasCase) -> None:
    result = explain(keras_case, "guided-backprop")
    want = keras_case.guided(keras_case.x, result.targets)
    per_image_close(result.input_gradients, want, 1e-4, "guided gradients")
    per_image_close(result.raw, np.abs(want).max(axis=-1), 1e-4, "guided backprop")


@pytest.mark.tf
def test_guided_gradcam_matches_its_definition(keras_case: KerasCase) -> None:
    """Guided gradients (TF) times the Grad-CAM heatmap, min-max scaled and upsampled
    bilinearly with half-pixel centres (the cam itself is held against TF in
    test_export_keras)."""
    import tensorflow as tf

    result = explain(keras_case, "guided-gradcam")
    guided = keras_case.guided(keras_case.x, result.targets)
    session = ort.InferenceSession(str(keras_case.bundle), providers=["CPUExecutionProvider"])
    (cam,) = session.run(["cam"], {"image": keras_case.images, "target": result.targets})
    low = cam.min(axis=(1, 2), keepdims=True)
    scaled = (cam - low) / (cam - low).max(axis=(1, 2), keepdims=True).clip(1e-7)
    size = keras_case.x.shape[1:3]
    mask = tf.image.resize(scaled[..., None], size, method="bilinear").numpy()
    want = guided * np.clip(mask, 0, 1)
    per_image_close(result.input_gradients, want, 1e-4, "guided grad-cam image")
    per_image_close(result.raw, np.abs(want).max(axis=-1), 1e-4, "guided grad-cam")


@pytest.mark.tf
def test_smoothgrad_matches_gradient_tape_with_the_same_noise(keras_case: KerasCase) -> None:
    result = explain(keras_case, "smoothgrad")
    samples, noise = OPTIONS["samples"], OPTIONS["noise"]
    maps, means = [], []
    for n, x in enumerate(keras_case.x):
        rng = np.random.default_rng([OPTIONS["seed"], n])
        sigma = np.float32(noise * (x.max() - x.min()))
        copies = x[None] + sigma * rng.standard_normal((samples, *x.shape), dtype=np.float32)
        gradients = keras_case.plain(copies, np.full(samples, result.targets[n]))
        maps.append(np.abs(gradients).max(axis=-1).mean(axis=0))
        means.append(gradients.mean(axis=0))
    per_image_close(result.raw, np.array(maps), 1e-4, "smoothgrad")
    per_image_close(result.input_gradients, np.array(means), 1e-4, "mean gradients")


@pytest.mark.tf
def test_integrated_gradients_match_gradient_tape(keras_case: KerasCase) -> None:
    result = explain(keras_case, "integrated-gradients")
    alphas = midpoints(OPTIONS["steps"]).astype(np.float32)
    want = []
    for n, x in enumerate(keras_case.x):
        path = alphas[:, None, None, None] * x[None]
        gradients = keras_case.plain(path, np.full(len(alphas), result.targets[n]))
        want.append(x * gradients.mean(axis=0))
    per_image_close(result.input_gradients, np.array(want), 1e-4, "attributions")
    per_image_close(result.raw, np.abs(np.array(want)).max(axis=-1), 1e-4,
                    "integrated gradients")


@pytest.mark.tf
def test_several_keras_layers_verify_against_gradient_tape(residual_path: Path,
                                                           tmp_path: Path) -> None:
    result = export(residual_path, tmp_path / "layers.onnx", input_gradients=True,
                    layer=["block2_out", "block1_out", "stem_relu"])
    report = result.report
    assert report is not None
    for name in ("activations.1", "gradients.2", "cam.2", "input_gradients"):
        assert report.errors[name] <= 1e-4, name
    assert [e.name for e in result.info.layers] == ["stem_relu", "block1_out", "block2_out"]

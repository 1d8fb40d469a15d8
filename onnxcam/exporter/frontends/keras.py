"""The Keras frontend: .keras, .h5 and SavedModel folders, via tf2onnx.

A Keras 3 ``Sequential`` has no symbolic output, and a pretrained base nested in
a ``Model`` hides its layers from the outer graph. Both are handled the same way:
the model is re-run layer by layer on a fresh ``keras.Input``, descending into
nested models, which yields one flat graph where every layer's output can be
tapped. TensorFlow is imported here only, and only when this module is used.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.frontends import (
    OutputShape,
    Reference,
    SourceModel,
    Tap,
    choose_output,
    pixels_layout,
    sha256_of,
    tf2onnx_lean,
)
from onnxcam.exporter.known_models import Family, keras_family
from onnxcam.exporter.layers import ACTIVATION, CONV, MERGE, OTHER, LayerInfo, choose_layers
from onnxcam.layout import Layout

log = logging.getLogger(__name__)

ROLES = {
    "Conv1D": CONV, "Conv2D": CONV, "Conv3D": CONV, "SeparableConv2D": CONV,
    "DepthwiseConv2D": CONV, "Conv2DTranspose": CONV,
    "Add": MERGE, "Concatenate": MERGE, "Multiply": MERGE, "Subtract": MERGE,
    "Average": MERGE, "Maximum": MERGE, "Minimum": MERGE,
    "Activation": ACTIVATION, "ReLU": ACTIVATION, "LeakyReLU": ACTIVATION,
    "PReLU": ACTIVATION, "ELU": ACTIVATION,
}
SQUASHING = {"softmax": "Softmax", "sigmoid": "Sigmoid"}


def _import_tf() -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    load_triton_first()
    try:
        with _startup_noise_dropped():
            import keras
            import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    except ImportError as exc:
        raise UnsupportedModelError(
            "Keras models need the export extra: pip install 'onnxcam[export]'"
        ) from exc
    return tf, keras


# What TensorFlow's C++ side prints on import, before absl's logging is set up, and
# so whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21 prints it twice): not for users.
_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom "
                            r"operations are on|cpu_feature_guard|rebuild TensorFlow with")


@contextmanager
def _startup_noise_dropped() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2) caught, and pass on
    every line of it but TensorFlow's start-up notices (all of it with -v)."""
    if "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            verbose = log.isEnabledFor(logging.INFO)
            lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = [line for line in lines if verbose or not _STARTUP_NOISE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def load_triton_first() -> None:
    """Load triton, when installed, before TensorFlow.

    Both carry their own LLVM; triton loaded after TensorFlow crashes the process
    (torch's compiler and exporter load it), so a session that converts a Keras model
    and then a torch module would die. Loaded first, both work.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: nothing to protect against
        pass


@dataclass
class FlatGraph:
    """A model re-run on a fresh input: every layer's output, in call order."""

    input: Any
    output: Any = None
    tensors: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerInfo] = field(default_factory=list)
    made_by: dict[int, str] = field(default_factory=dict)
    rebuilt: int = 0  # layers rebuilt for tf2onnx


def _is_functional(layer: Any) -> bool:
    return hasattr(layer, "_run_through_graph") and hasattr(layer, "_nodes_by_depth")


def _squash_name(layer: Any) -> str:
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    if type(layer).__name__ == "Softmax":
        return "Softmax"
    return SQUASHING.get(activation, "")


class Flattener:
    """Calls layers on new tensors, recursing into Sequential and functional models."""

    def __init__(self, keras: Any, final_layer: Any, rebuild: bool = False) -> None:
        self.keras = keras
        self.final_layer = final_layer
        self.rebuild = rebuild  # layers tf2onnx cannot convert, rebuilt (``rebuilt_call``)
        self.removed = ""
        self.rebuilt = 0

    def run(self, model: Any) -> FlatGraph:
        shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
        if shape is None or len(model.inputs) != 1:
            raise UnsupportedModelError("onnxcam needs a model with exactly one image input")
        if len(shape) != 3:
            raise UnsupportedModelError(
                f"the input has rank {len(shape) + 1}; onnxcam needs rank 4 (N, H, W, C)"
            )
        if any(d is None for d in shape):
            raise UnsupportedModelError(f"the model's input size {shape} is not fixed")
        if len(getattr(model, "outputs", [None])) != 1:
            raise UnsupportedModelError("onnxcam needs a classifier with one output")
        flat = FlatGraph(input=self.keras.Input(shape=shape, name="input"))
        flat.output = self.call(model, (flat.input,), {}, flat)
        return flat

    def call(self, layer: Any, args: tuple, kwargs: dict, flat: FlatGraph) -> Any:
        if isinstance(layer, self.keras.Sequential):
            x = args[0]
            for sub in layer.layers:
                x = self.call(sub, (x,), {}, flat)
            return x
        if _is_functional(layer):
            inputs = args[0] if len(args) == 1 else list(args)
            return layer._run_through_graph(
                inputs, operation_fn=lambda op: lambda *a, **k: self.call(op, a, k, flat)
            )
        if type(layer).__name__ == "InputLayer":
            return args[0]
        if layer is self.final_layer:
            return self.call_final(layer, args, kwargs, flat)
        output = rebuilt_call(self.keras, layer, args[0]) if self.rebuild else None
        if output is not None:
            self.rebuilt += 1
            return self.record(layer, output, args, flat)
        return self.record(layer, layer(*args, **kwargs), args, flat)

    def call_final(self, layer: Any, args: tuple, kwargs: dict, flat: FlatGraph) -> Any:
        """Call the output layer without its softmax/sigmoid ("swap softmax for linear")."""
        self.removed = _squash_name(layer)
        if type(layer).__name__ in ("Softmax", "Activation") and self.removed:
            return args[0]
        if self.removed:
            layer.activation = self.keras.activations.linear
        return self.record(layer, layer(*args, **kwargs), args, flat)

    def record(self, layer: Any, output: Any, args: tuple, flat: FlatGraph) -> Any:
        name = layer.name
        if name in flat.tensors:
            name = f"{name}_{len(flat.tensors)}"
        first = args[0] if args else None
        if isinstance(first, (list, tuple)):
            first = first[0] if first else None
        flat.tensors[name] = output
        shape = tuple(output.shape) if hasattr(output, "shape") else ()
        flat.layers.append(LayerInfo(
            name=name,
            op=type(layer).__name__,
            shape=shape,
            role=ROLES.get(type(layer).__name__, OTHER),
            source=flat.made_by.get(id(first)),
        ))
        flat.made_by[id(output)] = name
        return output


def rebuilt_call(keras: Any, layer: Any, x: Any) -> Any:
    """``layer`` called on ``x`` by ops that tf2onnx converts, where Keras's own call
    gives TF ops it cannot (None elsewhere). The same function, from the layer's own
    weights; verification taps the original layers, so it does not take this on trust.
    Each layer made here is named after ``layer``: Keras's automatic names start afresh
    in each process, and a loaded model holds them too (ConvNeXt has an ``add``).
    """
    if grouped(layer):
        return ungrouped_conv(keras, layer, x)
    if type(layer).__name__ == "Activation" and layer.activation is keras.activations.gelu:
        # TF's exact gelu is 0.5 x erfc(-x / sqrt 2), and tf2onnx has no Erfc.
        return keras.layers.Activation(erf_gelu, name=f"{layer.name}_erf")(x)
    return None


def erf_gelu(x: Any) -> Any:
    """The exact gelu by way of erf."""
    import keras

    return 0.5 * x * (1.0 + keras.ops.erf(x * float(1 / np.sqrt(2.0))))


def grouped(layer: Any) -> bool:
    """A grouped Conv2D (ConvNeXt's depthwise convs, RegNet's group convs).

    Keras's TensorFlow backend runs these inside an XLA-compiled function, since TF
    has no grouped convolution on CPU; tf2onnx cannot inline that function and leaves
    a ``StatefulPartitionedCall`` node no runtime knows.
    """
    return type(layer).__name__ == "Conv2D" and getattr(layer, "groups", 1) > 1


def ungrouped_conv(keras: Any, layer: Any, x: Any) -> Any:
    """The grouped Conv2D ``layer`` on ``x``, rebuilt from plain TF convolutions with
    its own weights: the same sums, which tf2onnx converts to ordinary Conv nodes.

    One group per input channel (depthwise) becomes a DepthwiseConv2D; other groups,
    one Conv2D per group on its slice of the channels, concatenated.
    """
    if layer.data_format != "channels_last":
        raise UnsupportedModelError(
            f"layer {layer.name!r}: a grouped Conv2D is supported channels-last only")
    kernel, *bias = (np.asarray(w) for w in layer.get_weights())
    height, width, per_group, filters = kernel.shape
    options = dict(kernel_size=layer.kernel_size, strides=layer.strides,
                   padding=layer.padding, dilation_rate=layer.dilation_rate,
                   activation=layer.activation, use_bias=layer.use_bias)
    if per_group == 1:  # output channel c * multiplier + m reads input channel c
        multiplier = filters // layer.groups
        depthwise = keras.layers.DepthwiseConv2D(depth_multiplier=multiplier,
                                                 name=f"{layer.name}_depthwise", **options)
        output = depthwise(x)
        depthwise.set_weights([kernel.reshape(height, width, layer.groups, multiplier), *bias])
        return output
    outputs, size = [], filters // layer.groups
    for g in range(layer.groups):
        conv = keras.layers.Conv2D(size, name=f"{layer.name}_group{g}", **options)
        channels = keras.layers.Lambda(lambda t, g=g: t[..., g * per_group:(g + 1) * per_group],
                                       name=f"{layer.name}_slice{g}")(x)
        outputs.append(conv(channels))
        conv.set_weights([kernel[..., g * size:(g + 1) * size],
                          *(b[g * size:(g + 1) * size] for b in bias)])
    return keras.layers.Concatenate(name=f"{layer.name}_groups")(outputs)


def final_layer(model: Any, keras: Any) -> Any:
    """The layer that produces the model's output, looking inside nested models."""
    if isinstance(model, keras.Sequential):
        return final_layer(model.layers[-1], keras)
    if _is_functional(model):
        return final_layer(model.outputs[0]._keras_history.operation, keras)
    return model


def load_keras_model(path: Path) -> Any:
    _, keras = _import_tf()
    try:
        return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: cannot load the Keras model ({exc})") from exc


def flatten(model: Any, rebuild: bool = False) -> tuple[FlatGraph, str]:
    """The flat graph and the name of the squashing activation removed ("" if none).

    With ``rebuild``, layers tf2onnx cannot convert are rebuilt from ones it can
    (``rebuilt_call``); the graph's ``rebuilt`` counts them.
    """
    _, keras = _import_tf()
    flattener = Flattener(keras, final_layer(model, keras), rebuild)
    flat = flattener.run(model)
    flat.rebuilt = flattener.rebuilt
    return flat, flattener.removed


def at_batch_1(shape: Any) -> OutputShape:
    """A Keras or TensorFlow shape with its open batch read as 1, as the ONNX
    frontend's shapes are; an unknown rank reads as [?, ?], for verification to judge."""
    try:
        dims = list(shape)
    except ValueError:
        return (None, None)
    return tuple(1 if axis == 0 and d is None else d for axis, d in enumerate(dims))


def scores_model(model: Any, logits: str | None) -> Any:
    """``model`` with one output, the class scores: ``logits`` (an output layer's name),
    or its only output. Several outputs become one by a model on the same layers."""
    outputs = list(getattr(model, "outputs", None) or [])
    if not outputs:  # a subclassed model: its output is found when it is flattened
        return model
    names = [output._keras_history.operation.name for output in outputs]
    chosen = choose_output({name: at_batch_1(output.shape)
                            for name, output in zip(names, outputs)}, logits)
    if len(outputs) == 1:
        return model
    _, keras = _import_tf()
    # The model's own name: the keras.applications family is known by it.
    return keras.Model(model.inputs, outputs[names.index(chosen)], name=model.name)


def list_layers(path: Path, logits: str | None = None) -> list[LayerInfo]:
    flat, _ = flatten(scores_model(load_keras_model(path), logits))
    return feeding_output(flat)


def feeding_output(flat: FlatGraph) -> list[LayerInfo]:
    """Layers that the output depends on, in call order."""
    needed = {flat.made_by.get(id(flat.output))}
    for layer in reversed(flat.layers):
        if layer.name in needed:
            needed.add(layer.source)
    # Merges have several inputs; only the first is tracked, so keep every earlier
    # layer unless it is clearly off the path (a dead branch after the output).
    last = max((i for i, layer in enumerate(flat.layers) if layer.name in needed), default=-1)
    return flat.layers[: last + 1]


def convert(tap_model: Any, shape: tuple[int, ...], opset: int) -> Any:
    """``tap_model`` through tf2onnx, in as little memory as it allows (``tf2onnx_lean``)."""
    tf, _ = _import_tf()
    import tf2onnx

    spec = [tf.TensorSpec((None, *shape), tf.float32, name="input")]
    try:
        return tf2onnx_lean.convert(tf2onnx.convert.from_keras, tap_model, input_signature=spec,
                                    opset=opset, optimizers=tf2onnx_lean.one_update_optimizer())
    except Exception as exc:
        raise UnsupportedModelError(f"tf2onnx could not convert the model: {exc}") from exc


def gradient_tape_reference(tap_model: Any) -> Any:
    """Logits, each tapped layer's activations and d logit[target] / d activations (and,
    when asked, d logit[target] / d input), by TF GradientTape. A segmenter's logits
    come NCHW, as its bundle's, and its score is the target class summed over pixels."""
    tf, _ = _import_tf()

    def run(images: Any, targets: Any, with_input: bool) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(images)
            logits, *activations = tap_model(images, training=False)
            if logits.shape.rank == 4:  # a segmenter's [N, h, w, K]: the class over all pixels
                logits = tf.transpose(logits, [0, 3, 1, 2])  # as the bundle's, class axis 1
                score = tf.gather(tf.reduce_sum(logits, axis=[2, 3]), targets, batch_dims=1)
            else:
                score = tf.gather(logits, targets, batch_dims=1)
        sources = [*activations, images] if with_input else activations
        return logits, activations, tape.gradient(score, sources)

    runs = {flag: tf.function(lambda x, t, flag=flag: run(x, t, flag), reduce_retracing=True)
            for flag in (False, True)}

    def reference(images: np.ndarray, targets: np.ndarray,
                  input_gradients: bool = False) -> Reference:
        logits, activations, gradients = runs[input_gradients](tf.constant(images),
                                                               tf.constant(targets))
        pairs = [(a.numpy(), g.numpy()) for a, g in zip(activations, gradients)]
        return Reference(logits=logits.numpy(), activations=pairs[0][0],
                         gradients=pairs[0][1], linear=True, more=pairs[1:],
                         input_gradients=gradients[-1].numpy() if input_gradients else None)

    return reference


def load(
    path: Path, layer: str | Sequence[str] | None = None, opset: int = 17,
    logits: str | None = None,
) -> SourceModel:
    """A .keras or .h5 file, or a SavedModel folder; ``logits`` names the output that
    holds the class scores (an output layer, or a serving signature's output key)."""
    if path.is_dir():
        return load_saved_model(path, layer, opset, logits)
    _, keras = _import_tf()
    model = scores_model(load_keras_model(path), logits)
    flat, removed = flatten(model, rebuild=True)
    layers = feeding_output(flat)
    chosen = choose_layers(layers, layer)
    log.info("target layers: %s", ", ".join(f"{c.name} ({c.op})" for c in chosen))

    def tap(graph: FlatGraph) -> Any:
        return keras.Model(graph.input, [graph.output, *(graph.tensors[c.name] for c in chosen)])

    tap_model = tap(flat)
    height, width, channels = (int(d) for d in flat.input.shape[1:])
    model_proto = convert(tap_model, (height, width, channels), opset)
    if flat.rebuilt:
        # Verification must not trust the rebuilt layers: it taps the model's own.
        log.info("%d layer(s) rebuilt from ops tf2onnx converts", flat.rebuilt)
        tap_model = tap(flatten(model)[0])
    tensors = [output.name for output in model_proto.graph.output[1:]]
    return SourceModel(
        model=model_proto,
        activation=tensors[0],
        layer=chosen[0].name,
        layout=Layout.NHWC,
        activation_layout=Layout.NHWC,
        height=height,
        width=width,
        channels=channels,
        source_format="h5" if path.suffix.lower() in (".h5", ".hdf5") else "keras",
        source_sha256=sha256_of(path),
        layers=layers,
        reference=gradient_tape_reference(tap_model),
        removed_activation=removed,
        more_layers=[Tap(c.name, tensor, Layout.NHWC)
                     for c, tensor in zip(chosen[1:], tensors[1:])],
        family=family_of(model, keras),
        pixels_layout=pixels_layout(at_batch_1(flat.output.shape), Layout.NHWC),
    )


def family_of(model: Any, keras: Any) -> Family | None:
    """The keras.applications family of ``model`` or of a model nested in it."""
    names, rescaling, stack = [], False, [model]
    while stack:
        layer = stack.pop(0)
        if isinstance(layer, keras.Model):
            names.append(layer.name)
            stack.extend(layer.layers)
        rescaling |= isinstance(layer, keras.layers.Rescaling)
    return keras_family(names, rescaling)


def load_saved_model(
    path: Path, layer: str | Sequence[str] | None, opset: int, logits: str | None = None,
) -> SourceModel:
    """A SavedModel folder: its serving signature goes through tf2onnx, then the ONNX
    frontend picks the layer; logits are verified against the signature itself."""
    tf, _ = _import_tf()
    import tf2onnx

    from onnxcam.exporter.frontends import onnx as onnx_frontend

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: not a loadable SavedModel ({exc})") from exc
    specs = signature.structured_input_signature[1]
    if len(specs) != 1:
        raise UnsupportedModelError(f"the SavedModel's signature has {len(specs)} inputs")
    (key, spec), = specs.items()
    outputs = signature.structured_outputs
    output_key = choose_output({key: at_batch_1(outputs[key].shape) for key in sorted(outputs)},
                               logits)
    spec = tf.TensorSpec(spec.shape, tf.float32, name="input")

    @tf.function(input_signature=[spec])
    def serve(images: Any) -> Any:
        return signature(**{key: images})[output_key]

    try:
        model_proto = tf2onnx_lean.convert(tf2onnx.convert.from_function, serve,
                                           input_signature=[spec], opset=opset)
    except Exception as exc:
        raise UnsupportedModelError(f"tf2onnx could not convert the SavedModel: {exc}") from exc
    with tempfile.TemporaryDirectory() as folder:
        converted = Path(folder) / "model.onnx"
        converted.write_bytes(model_proto.SerializeToString())
        source = onnx_frontend.load(converted, layer, Layout.NHWC, None, opset)

    def reference(images: np.ndarray, targets: np.ndarray, **_: Any) -> Reference:
        return Reference(logits=serve(tf.constant(images)).numpy())

    source.reference = reference
    source.source_format = "savedmodel"
    source.source_sha256 = sha256_of(path)
    return source

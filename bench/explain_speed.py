"""Grad-CAM throughput: onnxcam against plain inference, TF GradientTape and
pytorch-grad-cam.

Each side runs in its own process (TensorFlow and onnxruntime slow each other
down when they share one), one after the other in a single invocation, so the
ratios are measured side by side. Prints images/s and peak RSS per side.

    python bench/explain_speed.py                 # Keras ResNet50, 224x224, batch 8
    python bench/explain_speed.py --quick         # a tiny CNN, for CI
    python bench/explain_speed.py --source torch  # torch ResNet50, and pytorch-grad-cam
    python bench/explain_speed.py --source torch --device cuda   # all of it on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))
SIDES = ("plain", "gradcam", "fd", "tf", "pgc")
# The reference each source is held against: TF GradientTape for Keras, pytorch-grad-cam
# (the ``grad-cam`` package) for torch.
REFERENCE_SIDE = {"keras": "tf", "torch": "pgc"}


def build_torch(workdir: Path, quick: bool) -> dict:
    """A torchvision-shaped ResNet50 exported by torch.onnx, and its two bundles."""
    from torch_resnet import export_onnx

    from onnxcam.exporter import export

    size = 64 if quick else 224
    export_onnx(workdir / "plain.onnx", size)
    started = time.perf_counter()
    export(workdir / "plain.onnx", workdir / "bundle.onnx", preprocess="torch")
    export_seconds = time.perf_counter() - started
    export(workdir / "plain.onnx", workdir / "fd.onnx", preprocess="torch", gradient="fd")
    return {"size": size, "preprocess": "torch", "export_seconds": export_seconds,
            "layout": "nchw"}


def save_keras(workdir: Path, quick: bool) -> tuple[Path, int, str]:
    """Save the Keras model (ResNet50, or a tiny CNN) and its plain ONNX conversion;
    return the model's path, input size and preprocessing."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    if quick:
        size = 32
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
        preprocess = "unit"
    else:
        size = 224
        model = keras.applications.ResNet50(weights=None)
        preprocess = "caffe"
    keras_path = workdir / "model.keras"
    model.save(keras_path)
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name="input")]
    plain, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    (workdir / "plain.onnx").write_bytes(plain.SerializeToString())
    return keras_path, size, preprocess


def build(workdir: Path, quick: bool) -> dict:
    """Save the Keras model, its plain ONNX conversion, and the two bundles."""
    from onnxcam.exporter import export

    keras_path, size, preprocess = save_keras(workdir, quick)
    started = time.perf_counter()
    export(keras_path, workdir / "bundle.onnx", preprocess=preprocess)
    export_seconds = time.perf_counter() - started
    export(keras_path, workdir / "fd.onnx", preprocess=preprocess, gradient="fd", verify=False)
    return {"size": size, "preprocess": preprocess, "export_seconds": export_seconds,
            "layout": "nhwc"}


def images(count: int, size: int) -> object:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def timed(run, batches: list, warmup: int = 2) -> float:
    for batch in batches[:warmup]:
        run(batch)
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def run_side(side: str, workdir: Path, size: int, preprocess: str, count: int, batch: int,
             device: str, layout: str = "nhwc") -> dict:
    data = images(count, size)
    batches = [data[i : i + batch] for i in range(0, count, batch)]
    used = "cpu"
    if side == "plain":
        from onnxcam.exporter.preprocess import preprocess_numpy
        from onnxcam.runtime import make_session

        session, used = make_session(str(workdir / "plain.onnx"), device)
        name = session.get_inputs()[0].name
        def infer(b: object) -> None:
            x = preprocess_numpy(b, preprocess)
            session.run(None, {name: x.transpose(0, 3, 1, 2).copy() if layout == "nchw" else x})

        rate = timed(infer, batches)
    elif side in ("gradcam", "fd"):
        from onnxcam.engine import Explainer

        explainer = Explainer(workdir / ("bundle.onnx" if side == "gradcam" else "fd.onnx"),
                              device=device)
        used = explainer.device
        rate = timed(lambda b: explainer.explain(b, method="gradcam", batch_size=len(b)),
                     batches)
    elif side == "pgc":
        rate, used = pytorch_grad_cam_rate(workdir, batches, device)
    else:
        import keras
        import tensorflow as tf

        from onnxcam.exporter.preprocess import preprocess_numpy

        model = keras.saving.load_model(workdir / "model.keras", compile=False)
        layer = model.layers[-1]
        layer.activation = keras.activations.linear
        target_layer = "last_conv" if size == 32 else "conv5_block3_out"
        grad_model = keras.Model(model.inputs, [model.get_layer(target_layer).output,
                                                model.output])

        @tf.function
        def gradcam(x: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                activations, logits = grad_model(x, training=False)
                score = tf.reduce_max(logits, axis=1)
            grads = tape.gradient(score, activations)
            weights = tf.reduce_mean(grads, axis=(1, 2))
            return tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, weights))

        rate = timed(lambda b: gradcam(tf.constant(preprocess_numpy(b, preprocess))).numpy(),
                     batches)
    return {"side": side, "images_per_s": rate, "peak_rss_mb": peak_rss_mb(), "device": used}


def pytorch_grad_cam_rate(workdir: Path, batches: list, device: str) -> tuple[float, str]:
    """pytorch-grad-cam's GradCAM on the torch model the ONNX file was exported from, at
    its last bottleneck (the bundle's default layer), each image's top class."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from torch_resnet import resnet50

    used = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    model = resnet50()
    model.load_state_dict(torch.load(workdir / "plain.pt"))
    model = model.to(used).eval()
    cam = GradCAM(model=model, target_layers=[model[-4]])
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def explain(b: np.ndarray) -> None:
        x = ((b.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
        cam(input_tensor=torch.from_numpy(np.ascontiguousarray(x)).to(used), targets=None)

    return timed(explain, batches), used


def run_sides(script: str, sides: list[str], config: dict) -> dict[str, dict]:
    """Each side of ``script`` in its own process (``--side S --config JSON``), one after
    the other; the last line each prints is its JSON result."""
    results = {}
    for side in sides:
        output = subprocess.run(
            [sys.executable, script, "--side", side, "--config", json.dumps(config)],
            check=True, capture_output=True, text=True,
        ).stdout
        results[side] = json.loads(output.strip().splitlines()[-1])
    return results


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not survive exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few images (CI)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sides", default=None, help="default: all that apply")
    parser.add_argument("--source", default="keras", choices=("keras", "torch"),
                        help="Keras ResNet50, or a torch ResNet50 exported to ONNX")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        config = json.loads(args.config)
        print(json.dumps(run_side(args.side, Path(config["workdir"]), config["size"],
                                  config["preprocess"], config["images"], config["batch"],
                                  config["device"], config["layout"])))
        return
    count = args.images or (32 if args.quick else 96)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        built = (build_torch if args.source == "torch" else build)(workdir, args.quick)
        config = {"workdir": str(workdir), "size": built["size"], "images": count,
                  "batch": args.batch, "preprocess": built["preprocess"],
                  "device": args.device, "layout": built["layout"]}
        results = {}
        others = {side for source, side in REFERENCE_SIDE.items() if source != args.source}
        sides = args.sides or ",".join(s for s in SIDES if s not in others)
        results.update(run_sides(__file__, sides.split(","), config))
    model = {("keras", True): "tiny Keras CNN 32x32", ("keras", False): "Keras ResNet50 224x224",
             ("torch", True): "torch ResNet50 64x64",
             ("torch", False): "torch ResNet50 224x224"}[(args.source, args.quick)]
    print(f"{model}, batch {args.batch}, {count} images, {os.cpu_count()} cores; "
          f"bundle export with verification took {built['export_seconds']:.1f} s")
    plain = results.get("plain", {}).get("images_per_s")
    for side, result in results.items():
        ratio = f"{result['images_per_s'] / plain:5.2f}x plain" if plain else ""
        print(f"  {side:8s} {result['images_per_s']:8.1f} images/s  {ratio}  "
              f"peak RSS {result['peak_rss_mb']:7.0f} MB  on {result['device']}")


if __name__ == "__main__":
    main()

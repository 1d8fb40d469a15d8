"""Peak memory and time of ``onnxcam.export`` for torchvision and keras.applications
models (issue 10: under 2 GB and 60 s at the usual layer on 2 cores).

Two subprocesses per model. For torch, the first writes the dynamic-batch ONNX file
and names the usual layer's tensor; a fresh one then exports it with verification on
and reports its own peak RSS (``resource.getrusage``), so torch's memory is not
counted. For Keras (``--keras``), the first saves the model (``weights=None``, 1000
classes) as a .keras file; the second exports it at the default layer, TensorFlow's
memory included, as a user's export would be.

    python bench/export_memory.py [--models vgg11,resnet18] [--size 224] [--threads 2]
    python bench/export_memory.py --keras [--models ResNet50,VGG16]
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
from typing import Any

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402  (tests/zoo.py, the shared zoo)

TIMEOUT_S = 600
KERAS_FAMILIES = ("ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0",
                  "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2",
                  "MobileNetV3Small", "NASNetMobile", "ResNet50", "ResNet50V2", "VGG16",
                  "Xception")


def write_source(name: str, size: int, work: Path) -> None:
    """Child 1: the dynamic-batch ONNX file and the usual layer's tensor name."""
    entry = at_size(zoo.ZOO[name], size)
    model = entry.model()
    path = zoo.export_torch(entry, model, "dynamic", work / "model.onnx")
    example = zoo.torch_input(zoo.images(size, 1, seed=99))
    layer = zoo.onnx_layer_name(path, model, entry.layer, example)
    (work / "layer.txt").write_text(layer)


def at_size(entry: Any, size: int) -> Any:
    """The zoo's ``entry`` at input ``size``: its BatchNorm calibrated there (statistics
    from 64-pixel images blow up 224-pixel activations) and ViT built for it."""
    import dataclasses

    if size == entry.size:
        return entry
    build = zoo._tv(entry.name, image_size=size) if entry.reshape == "vit" else entry.build
    return dataclasses.replace(entry, size=size, build=build)


def write_keras_source(name: str, size: int, work: Path) -> None:
    """Child 1 (Keras): the keras.applications model ``name`` as a .keras file."""
    import keras

    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    model.save(work / "model.keras")


def measure_export(work: Path) -> dict[str, Any]:
    """Child 2: onnxcam's export with verification on; its own time and peak RSS."""
    from onnxcam import export

    keras_file = work / "model.keras"
    start = time.perf_counter()
    if keras_file.exists():  # the default layer, the family's own preprocessing
        result = export(keras_file, work / "bundle.onnx")
    else:
        result = export(work / "model.onnx", work / "bundle.onnx",
                        layer=(work / "layer.txt").read_text(), preprocess=zoo.PREPROCESS)
    return {"seconds": time.perf_counter() - start, "gradient": result.info.gradient,
            "layer": result.info.target_layer,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def run_child(args: list[str], threads: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # taskset pins the child to ``threads`` cores, which onnxruntime reads as its count.
    cores = ["taskset", "-c", ",".join(str(c) for c in range(threads))]
    return subprocess.run([*cores, sys.executable, __file__, *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def measure(name: str, size: int, threads: int, keras: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "size": size}
    if not keras:
        row["usual_layer"] = zoo.ZOO[name].layer
    with tempfile.TemporaryDirectory(prefix=f"mem_{name}_") as folder:
        source = "--keras-source" if keras else "--source"
        made = run_child([source, name, str(size), folder], threads)
        if made.returncode:
            return {**row, "error": made.stderr.strip().splitlines()[-1:]}
        done = run_child(["--export", folder], threads)
        if done.returncode:
            return {**row, "error": done.stderr.strip().splitlines()[-1:]}
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="default: resnet18,vgg11; with --keras, "
                        "every keras.applications family's first member")
    parser.add_argument("--keras", action="store_true", help="keras.applications models")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--keras-source", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.source or args.keras_source:
        name, size, work = args.source or args.keras_source
        (write_source if args.source else write_keras_source)(name, int(size), Path(work))
        return
    if args.export:
        print(json.dumps(measure_export(Path(args.export))))
        return
    models = args.models or (",".join(KERAS_FAMILIES) if args.keras else "resnet18,vgg11")
    for name in models.split(","):
        print(json.dumps(measure(name, args.size, args.threads, args.keras)), flush=True)


if __name__ == "__main__":
    main()

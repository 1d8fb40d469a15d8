"""Whole-network gradient throughput: saliency and guided Grad-CAM against plain inference.

One bundle exported with ``--input-gradients --guided`` serves every onnxcam side;
Grad-CAM on it shows that the unrequested backward passes are pruned away. Each
side runs in its own process, one after the other in a single invocation (see
``explain_speed.py``), and prints images/s, the ratio of its time per image to
plain inference's, and peak RSS.

    python bench/gradient_speed.py                 # Keras ResNet50, 224x224, batch 8
    python bench/gradient_speed.py --quick         # a tiny CNN, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))
from explain_speed import images, peak_rss_mb, run_sides, save_keras, timed  # noqa: E402

SIDES = ("plain", "gradcam", "saliency", "guided-gradcam")


def build(workdir: Path, quick: bool) -> dict:
    """Save the Keras model, its plain ONNX conversion, and the gradient bundle."""
    from onnxcam.exporter import export

    keras_path, size, preprocess = save_keras(workdir, quick)
    started = time.perf_counter()
    export(keras_path, workdir / "bundle.onnx", preprocess=preprocess, input_gradients=True,
           guided=True)
    return {"size": size, "preprocess": preprocess,
            "export_seconds": time.perf_counter() - started}


def run_side(side: str, workdir: Path, size: int, preprocess: str, count: int, batch: int,
             device: str) -> dict:
    data = images(count, size)
    batches = [data[i : i + batch] for i in range(0, count, batch)]
    if side == "plain":
        from onnxcam.exporter.preprocess import preprocess_numpy
        from onnxcam.runtime import make_session

        session, used = make_session(str(workdir / "plain.onnx"), device)
        name = session.get_inputs()[0].name
        rate = timed(lambda b: session.run(None, {name: preprocess_numpy(b, preprocess)}),
                     batches)
    else:
        from onnxcam.engine import Explainer

        explainer = Explainer(workdir / "bundle.onnx", device=device)
        used = explainer.device
        rate = timed(lambda b: explainer.explain(b, method=side, batch_size=len(b)), batches)
    return {"side": side, "images_per_s": rate, "peak_rss_mb": peak_rss_mb(), "device": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few images (CI)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        config = json.loads(args.config)
        print(json.dumps(run_side(args.side, Path(config["workdir"]), config["size"],
                                  config["preprocess"], config["images"], config["batch"],
                                  config["device"])))
        return
    count = args.images or (32 if args.quick else 48)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        built = build(workdir, args.quick)
        config = {"workdir": str(workdir), "size": built["size"], "images": count,
                  "batch": args.batch, "preprocess": built["preprocess"],
                  "device": args.device}
        results = run_sides(__file__, args.sides.split(","), config)
    model = "tiny Keras CNN 32x32" if args.quick else "Keras ResNet50 224x224"
    print(f"{model}, batch {args.batch}, {count} images, {os.cpu_count()} cores; bundle "
          f"(--input-gradients --guided) export with verification took "
          f"{built['export_seconds']:.1f} s")
    plain = results.get("plain", {}).get("images_per_s")
    for side, result in results.items():
        cost = f"{plain / result['images_per_s']:5.2f}x plain's time" if plain else ""
        print(f"  {side:15s} {result['images_per_s']:8.1f} images/s  {cost}  "
              f"peak RSS {result['peak_rss_mb']:7.0f} MB  on {result['device']}")


if __name__ == "__main__":
    main()

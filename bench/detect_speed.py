"""Maps for 20 detections of one image (issue 22, item 2) against plain detection
inference, on the CPU: YOLOv8n built from ultralytics' YAML (random weights, class
biases calibrated so that about 20 detections pass), exported by ultralytics (dynamic)
and made into a bundle. Timed side by side, best of ``--repeat`` after a warm-up:

  source      the ultralytics ONNX export in onnxruntime (what plain inference runs)
  explain     Explainer.explain: detections picked, 20 maps, each at its own level's
              layer through that level's local head (the default bundle)
  one_layer   the same with a bundle at the stride-8 layer alone (``layer="model.15"``):
              the trunk once, then the whole part after the layer per detection

    python bench/detect_speed.py              # 640x640
    python bench/detect_speed.py --size 320   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

DETECTIONS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import numpy as np
    import ultralytics_models as um

    import onnxcam
    from onnxcam.runtime import cpu_session

    image = um.test_image(args.size)
    yolo, model = um.build("yolov8n", size=args.size)
    # Enough findings per level that NMS leaves at least 20.
    um.calibrate_class_biases(model, image, per_level=30)
    folder = Path(tempfile.mkdtemp())
    source = um.export_onnx(yolo, folder / "yolov8n.onnx", size=args.size, dynamic=True)
    size = (args.size, args.size)
    explainers = {}
    for side, layer in (("explain", None), ("one_layer", "model.15")):
        bundle = folder / f"{side}.cam.onnx"
        onnxcam.export(source, bundle, preprocess="unit", input_size=size, layer=layer)
        explainers[side] = onnxcam.Explainer(bundle, device="cpu", threads=args.threads)
    found = len(explainers["explain"].explain(image[None], max_detections=300).detections)
    if found < DETECTIONS:
        sys.exit(f"only {found} detections; raise per_level")
    plain = cpu_session(source.read_bytes())
    pixels = (image[None].astype(np.float32) / 255).transpose(0, 3, 1, 2)
    runs = {"source": lambda: plain.run(None, {"images": pixels})}
    for side, explainer in explainers.items():
        runs[side] = lambda e=explainer: e.explain(image[None], targets=f"top:{DETECTIONS}")
    times = timed_together(runs, args.repeat)
    print(json.dumps({"size": args.size, "detections_found": found,
                      "seconds": {k: round(v, 4) for k, v in times.items()},
                      "over_source": {k: round(v / times["source"], 2) for k, v in times.items()}}))


def timed_together(runs: dict, repeat: int) -> dict:  # type: ignore[type-arg]
    """Seconds of each run, the best of ``repeat`` rounds that run each once in turn
    (a warm-up round first), so that a noisy machine slows every side alike."""
    import time

    best = dict.fromkeys(runs, float("inf"))
    for round_ in range(repeat + 1):
        for side, run in runs.items():
            started = time.perf_counter()
            run()
            if round_:
                best[side] = min(best[side], time.perf_counter() - started)
    return best


if __name__ == "__main__":
    main()

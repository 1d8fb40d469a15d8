"""Maps for 20 detections of one image (issue 22, item 2) against plain detection
inference, on the CPU: YOLOv8n built from ultralytics' YAML (random weights, class
biases calibrated so that about 20 detections pass), exported by ultralytics (dynamic)
and made into a bundle. Timed, best of ``--repeat`` after a warm-up:

  source    the ultralytics ONNX export in onnxruntime (what plain inference runs)
  trunk     the bundle's trunk alone (logits, boxes and what the head reads)
  explain   Explainer.explain: detections picked, 20 maps (trunk once, head per row)

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
from targets_speed import timed  # noqa: E402 - the bench folder is the script's own

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
    from onnxcam.bundle import INPUT_IMAGE
    from onnxcam.runtime import cpu_session

    image = um.test_image(args.size)
    yolo, model = um.build("yolov8n", size=args.size)
    # Enough findings per level that NMS leaves at least 20.
    um.calibrate_class_biases(model, image, per_level=30)
    folder = Path(tempfile.mkdtemp())
    source = um.export_onnx(yolo, folder / "yolov8n.onnx", size=args.size, dynamic=True)
    bundle = folder / "yolov8n.cam.onnx"
    onnxcam.export(source, bundle, preprocess="unit", input_size=(args.size, args.size))

    explainer = onnxcam.Explainer(bundle, device="cpu", threads=args.threads)
    found = len(explainer.explain(image[None], max_detections=300).detections)
    if found < DETECTIONS:
        sys.exit(f"only {found} detections; raise per_level")
    plain = cpu_session(source.read_bytes())
    pixels = (image[None].astype(np.float32) / 255).transpose(0, 3, 1, 2)
    trunk, _ = explainer.sessions.cut()
    times = {
        "source": timed(lambda: plain.run(None, {"images": pixels}), args.repeat),
        "trunk": timed(lambda: trunk.run(None, {INPUT_IMAGE: image[None]}), args.repeat),
        "explain": timed(lambda: explainer.explain(image[None], targets=f"top:{DETECTIONS}"),
                         args.repeat),
    }
    print(json.dumps({"size": args.size, "detections_found": found,
                      "seconds": {k: round(v, 4) for k, v in times.items()},
                      "explain_over_source": round(times["explain"] / times["source"], 2)}))


if __name__ == "__main__":
    main()

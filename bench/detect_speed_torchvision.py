"""Maps for up to 20 detections of one image (issue 22, item 2) on a torchvision
detector, on the CPU, side by side: the model calibrated as the tests calibrate it
(``tests/torchvision_detectors.py``, 20 to 60 detections), exported as its users
export it (legacy exporter) and made into a bundle. Each side runs in its own process
(torch and onnxruntime in one process slow each other). Timed, best of ``--repeat``
after a warm-up:

  source    the user's ONNX file in onnxruntime (plain detection inference)
  onnxcam   Explainer.explain(image, targets="top:20"): its detections and 20 maps
  pgc       pytorch-grad-cam's GradCAM with FasterRCNNBoxScoreTarget, box by box

    python bench/detect_speed_torchvision.py                       # SSDlite
    python bench/detect_speed_torchvision.py --family retinanet_resnet50_fpn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets_speed import timed  # noqa: E402 - the bench folder is the script's own

DETECTIONS = 20


def build(family: str, folder: Path) -> None:
    import pickle

    import numpy as np
    import torchvision_detectors as tv

    detector = tv.build(family, folder, detections=(DETECTIONS, 3 * DETECTIONS))
    np.save(folder / "image.npy", detector.image)
    (folder / "model.pkl").write_bytes(pickle.dumps(detector.model))


def source_side(family: str, folder: Path, repeat: int) -> float:
    import numpy as np

    from onnxcam.runtime import cpu_session

    session = cpu_session((folder / f"{family}.onnx").read_bytes())
    image = np.load(folder / "image.npy").transpose(2, 0, 1).astype(np.float32) / 255
    name = session.get_inputs()[0].name
    return timed(lambda: session.run(None, {name: image}), repeat)


def onnxcam_side(family: str, folder: Path, repeat: int) -> float:
    import numpy as np

    import onnxcam

    bundle = folder / f"{family}.cam.onnx"
    onnxcam.export(folder / f"{family}.onnx", bundle)
    explainer = onnxcam.Explainer(bundle, device="cpu")
    image = np.load(folder / "image.npy")[None]
    rows = len(explainer.explain(image, targets=f"top:{DETECTIONS}").detections)
    assert rows == DETECTIONS, rows
    return timed(lambda: explainer.explain(image, targets=f"top:{DETECTIONS}"), repeat)


def pgc_side(family: str, folder: Path, repeat: int) -> float:
    import pickle

    import numpy as np
    import torch
    import torchvision_detectors as tv
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    model = pickle.loads((folder / "model.pkl").read_bytes())
    image = tv.as_tensor(np.load(folder / "image.npy"))[None]
    layer = model.get_submodule(tv.FAMILIES[family][2])
    with torch.no_grad():
        (found,) = model(image)

    def every_box() -> None:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for box, label in zip(found["boxes"][:DETECTIONS].numpy(),
                                  found["labels"][:DETECTIONS].tolist()):
                cam(image, targets=[FasterRCNNBoxScoreTarget([label], [box])])

    return timed(every_box, repeat)


SIDES = {"source": source_side, "onnxcam": onnxcam_side, "pgc": pgc_side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--side", choices=[*SIDES, "build"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "build":
        build(args.family, args.folder)
        return
    if args.side:
        print(json.dumps({args.side: SIDES[args.side](args.family, args.folder, args.repeat)}))
        return
    folder = Path(tempfile.mkdtemp())
    times: dict[str, float] = {}
    for side in ["build", *SIDES]:
        done = subprocess.run([sys.executable, "-W", "ignore", __file__, "--family",
                               args.family, "--repeat", str(args.repeat), "--side", side,
                               "--folder", str(folder)], check=True, capture_output=True,
                              text=True)
        if side != "build":
            times.update(json.loads(done.stdout.strip().splitlines()[-1]))
    times["onnxcam/source"] = times["onnxcam"] / times["source"]
    times["pgc/source"] = times["pgc"] / times["source"]
    times["pgc/onnxcam"] = times["pgc"] / times["onnxcam"]
    print(json.dumps({"family": args.family, "detections": DETECTIONS,
                      **{k: round(v, 4) for k, v in times.items()}}))


if __name__ == "__main__":
    main()

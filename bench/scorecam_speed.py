"""Score-CAM on a ResNet50: onnxcam's engine against pytorch-grad-cam's ScoreCAM,
side by side, each in its own process, on the same random-weight model and images.

Score-CAM runs the model once per channel of the target layer (2048 here) for each
image, so it is by far the slowest method; what matters is images per second and
that memory stays flat (issue 12 saw 3.2 GB for one image and 8.8 GB for 50).

    python bench/scorecam_speed.py               # 224x224, 2 images (tens of minutes)
    python bench/scorecam_speed.py --quick       # 64x64, 2 images
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def images(count: int, size: int):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def onnxcam_side(workdir: Path, count: int, size: int, batch: int) -> float:
    from onnxcam.engine import Explainer

    explainer = Explainer(workdir / "bundle.onnx", device="cpu")
    data = images(count, size)
    explainer.explain(data[:1], method="gradcam")  # sessions built
    started = time.perf_counter()
    explainer.explain(data, method="scorecam", batch_size=batch)
    return count / (time.perf_counter() - started)


def pytorch_grad_cam_side(workdir: Path, count: int, size: int, batch: int) -> float:
    import torch
    from pytorch_grad_cam import ScoreCAM
    from torch_resnet import resnet50

    from onnxcam.exporter.preprocess import preprocess_numpy

    torch.manual_seed(0)
    model = resnet50()
    model.load_state_dict(torch.load(workdir / "weights.pt"))
    x = torch.from_numpy(preprocess_numpy(images(count, size), "torch").transpose(0, 3, 1, 2)
                         .copy())
    cam = ScoreCAM(model=model, target_layers=[model[-4]])
    cam.batch_size = 32  # masked inputs per forward pass, as onnxcam's SCORE_BATCH
    started = time.perf_counter()
    for start in range(0, count, batch):
        cam(input_tensor=x[start : start + batch], targets=None)
    return count / (time.perf_counter() - started)


def build(workdir: Path, size: int) -> None:
    import torch
    from torch_resnet import resnet50

    from onnxcam.exporter import export

    torch.manual_seed(0)
    model = resnet50()
    torch.save(model.state_dict(), workdir / "weights.pt")
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(workdir / "plain.onnx"),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}}, opset_version=17, dynamo=False)
    export(workdir / "plain.onnx", workdir / "bundle.onnx", preprocess="torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 input")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images per explain call")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = onnxcam_side if args.side == "onnxcam" else pytorch_grad_cam_side
        rate = run(args.workdir, args.images, args.size, args.batch)
        print(json.dumps({"images_per_s": rate, "peak_rss_mb": peak_rss_mb()}))
        return
    size = 64 if args.quick else 224
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "sys.path.insert(0, sys.argv[1]); from scorecam_speed import build; "
                        "build(Path(sys.argv[2]), int(sys.argv[3]))",
                        str(Path(__file__).parent), str(workdir), str(size)],
                       check=True, capture_output=True)
        results = {}
        for side in ("onnxcam", "pytorch-grad-cam"):
            done = subprocess.run(
                [sys.executable, __file__, "--side", side, "--workdir", str(workdir),
                 "--size", str(size), "--images", str(args.images), "--batch", str(args.batch)],
                check=True, capture_output=True, text=True)
            results[side] = json.loads(done.stdout.splitlines()[-1])
    print(f"Score-CAM, ResNet50 at {size}x{size} (2048 channels), {args.images} images")
    for side, result in results.items():
        print(f"{side:<17} {result['images_per_s']:8.4f} images/s  "
              f"peak RSS {result['peak_rss_mb']:7.1f} MB")
    ratio = results["onnxcam"]["images_per_s"] / results["pytorch-grad-cam"]["images_per_s"]
    print(f"onnxcam / pytorch-grad-cam speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()

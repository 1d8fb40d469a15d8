"""Many targets per image (issue 21): a 14-finding DenseNet121 explained for one target,
for all 14 in one call, and in 14 calls, against pytorch-grad-cam's 14 calls.

Each side runs in its own process, one after the other in a single invocation, so
the ratios are measured side by side on the CPU:

  one       onnxcam, each image's top finding (one target per image)
  together  onnxcam, all 14 findings of every image in one call
  separate  onnxcam, 14 calls, one finding each
  pgc       pytorch-grad-cam GradCAM, 14 calls (one ClassifierOutputTarget each) on a
            torchvision DenseNet121 with the same 14-way head

    python bench/targets_speed.py            # 224x224, batch of 8
    python bench/targets_speed.py --quick    # 64x64, for CI
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
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # every side on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from explain_speed import run_sides  # noqa: E402 - the bench folder is the script's own

SIDES = ("one", "together", "separate", "pgc")
# Eight of scikit-image's colour photos; the heads are spread on the first six.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel")


def build(workdir: Path, size: int) -> float:
    """The Keras model's bundle; returns the export's seconds."""
    import models

    from onnxcam.exporter import export

    models.densenet121_findings(size=size).save(workdir / "findings.keras")
    started = time.perf_counter()
    export(workdir / "findings.keras", workdir / "findings.cam.onnx", preprocess="unit")
    return time.perf_counter() - started


def timed(run, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds of one ``run()``, the best of ``repeat`` after a warm-up run."""
    run()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def onnxcam_side(side: str, workdir: Path, images, findings: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    from onnxcam.engine import Explainer

    explainer = Explainer(workdir / "findings.cam.onnx", device="cpu")
    every = list(range(findings))
    batch = len(images)
    if side == "one":
        return timed(lambda: explainer.explain(images, batch_size=batch), repeat)
    if side == "together":
        return timed(lambda: explainer.explain(images, targets=[every] * batch,
                                               batch_size=batch), repeat)
    return timed(lambda: [explainer.explain(images, targets=c, batch_size=batch)
                          for c in every], repeat)


def pgc_side(images, size: int, findings: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """pytorch-grad-cam's GradCAM at features.norm5 (as the zoo tests explain
    DenseNet), one call per finding for the whole batch."""
    import models
    import zoo
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = models.torch_findings("densenet121", size, findings)
    x = zoo.torch_input(images)
    with GradCAM(model=model, target_layers=[model.features.norm5]) as cam:
        def run() -> None:
            for c in range(findings):
                cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(images))

        return timed(run, repeat)


def run_side(side: str, config: dict) -> dict:
    import models

    images = models.photos(config["size"], PHOTOS)[: config["batch"]]
    if side == "pgc":
        seconds = pgc_side(images, config["size"], config["findings"], config["repeat"])
    else:
        seconds = onnxcam_side(side, Path(config["workdir"]), images, config["findings"],
                               config["repeat"])
    return {"side": side, "seconds": seconds}


def report(results: dict, args: argparse.Namespace, export_seconds: float) -> None:
    size = 64 if args.quick else 224
    print(f"DenseNet121 {size}x{size}, 14 sigmoid findings, batch of {args.batch}, "
          f"{os.cpu_count()} cores, best of {args.repeat}; bundle export {export_seconds:.1f} s")
    print(f"  {'side':10s} {'seconds':>8s}")
    for side, result in results.items():
        print(f"  {side:10s} {result['seconds']:8.2f}")
    seconds = {side: result["seconds"] for side, result in results.items()}
    base = seconds.get("together")
    if base:
        for name, top, bottom in (("b/a", "together", "one"), ("c/b", "separate", "together"),
                                  ("d/b", "pgc", "together")):
            if top in seconds and bottom in seconds:
                print(f"  {name} ({top}/{bottom}) {seconds[top] / seconds[bottom]:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 (CI)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, json.loads(args.config))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        size = 64 if args.quick else 224
        export_seconds = build(workdir, size)
        config = {"workdir": str(workdir), "size": size, "batch": args.batch,
                  "findings": 14, "repeat": args.repeat}
        results = run_sides(__file__, args.sides.split(","), config)
    report(results, args, export_seconds)


if __name__ == "__main__":
    main()

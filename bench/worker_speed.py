"""End-to-end throughput of one worker against the engine in-process.

The same bundle and the same JPEG files, two sides, each in its own process:

- engine: ``Explainer.explain(paths)`` in-process (decode, resize, explain);
- worker: ``submit`` to Redis, one ``onnxcam worker`` process decodes, explains
  and stores heatmaps, overlays and records; timed from the first submit to the
  last job done.

    python bench/worker_speed.py            # Keras ResNet50, 224x224, 96 images
    python bench/worker_speed.py --quick    # a tiny CNN, for CI

Needs a Redis server (ONNXCAM_BROKER_URL, default redis://127.0.0.1:6379/13).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, size * size, dtype=np.float32).reshape(size, size)
    paths = []
    for index in range(count):
        noise = rng.normal(0, 40, (size, size, 3))
        pixels = np.clip(noise + np.roll(smooth, 9 * index)[..., None], 0, 255)
        path = folder / f"img{index:04d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def engine_side(bundle: Path, paths: list[Path], batch: int) -> float:
    from onnxcam.engine import Explainer

    explainer = Explainer(bundle)
    explainer.explain([str(p) for p in paths[:batch]], batch_size=batch)  # warm-up
    started = time.perf_counter()
    explainer.explain([str(p) for p in paths], batch_size=batch)
    return len(paths) / (time.perf_counter() - started)


def worker_side(bundle: Path, paths: list[Path], workdir: Path, chunk: int) -> float:
    from onnxcam.worker.client import submit
    from onnxcam.worker.settings import load_settings

    env = {
        "ONNXCAM_BROKER_URL": os.environ.get("ONNXCAM_BROKER_URL",
                                             "redis://127.0.0.1:6379/13"),
        "ONNXCAM_STORE_URL": str(workdir / "store"),
        "ONNXCAM_ALLOWED_ROOTS": str(paths[0].parent),
        "ONNXCAM_INLINE_MAX_BYTES": "0",
    }
    import redis

    redis.Redis.from_url(env["ONNXCAM_BROKER_URL"]).flushdb()
    settings = load_settings(**{k[len("ONNXCAM_"):].lower(): v for k, v in env.items()})
    log = (workdir / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "onnxcam.cli", "worker", "--concurrency", "1",
         "--loglevel", "WARNING"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        submit(bundle, paths[:chunk], chunk_size=chunk, settings=settings).wait(timeout=600)
        started = time.perf_counter()
        job = submit(bundle, paths, chunk_size=chunk, settings=settings)
        records = job.wait(timeout=1800, interval=0.05)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert all(r["status"] == "ok" for r in records), "a job failed"
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CNN, few images (CI)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16, help="images per job")
    parser.add_argument("--side", choices=("engine", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one side, result as JSON on stdout
        paths = sorted((args.workdir / "images").iterdir())
        bundle = args.workdir / "bundle.onnx"
        rate = (engine_side(bundle, paths, args.batch) if args.side == "engine"
                else worker_side(bundle, paths, args.workdir, args.chunk))
        print(json.dumps({"side": args.side, "images_per_s": rate}))
        return
    count = args.images or (32 if args.quick else 96)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        built = subprocess.run(
            [sys.executable, "-c", "import sys, json; from pathlib import Path; "
             "sys.path.insert(0, sys.argv[1]); from explain_speed import build; "
             "print(json.dumps(build(Path(sys.argv[2]), sys.argv[3] == '1')))",
             str(Path(__file__).parent), str(workdir), "1" if args.quick else "0"],
            check=True, capture_output=True, text=True)
        size = json.loads(built.stdout.splitlines()[-1])["size"]
        write_images(workdir / "images", count, max(size, 256) if not args.quick else size)
        rates = {}
        for side in ("engine", "worker"):
            result = subprocess.run(
                [sys.executable, __file__, "--side", side, "--workdir", str(workdir),
                 "--batch", str(args.batch), "--chunk", str(args.chunk)],
                check=True, capture_output=True, text=True)
            rates[side] = json.loads(result.stdout.splitlines()[-1])["images_per_s"]
    ratio = rates["worker"] / rates["engine"]
    print(f"{count} images, batch {args.batch}, {args.chunk} images per job")
    print(f"engine in-process : {rates['engine']:7.1f} images/s")
    print(f"one worker (Redis): {rates['worker']:7.1f} images/s  ({ratio:.2f}x the engine)")


if __name__ == "__main__":
    main()

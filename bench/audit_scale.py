"""The audit at scale: rows per second, peak memory and report time as the manifest
grows, locally and over two workers.

A generated manifest of small images (a few hundred 32x32 PNGs, each listed many
times, each row with a box) and a tiny ONNX CNN; each measurement runs in its own
process, so its peak RSS is its own:

- local: ``onnxcam audit`` in-process at each size (default 10,000 and 100,000 rows);
  memory is flat when the peaks stay within 10% of each other;
- workers: the same audit fanned out to two ``onnxcam worker`` processes
  (concurrency 1 each) through Redis, at the smaller size;
- report: summarising results.csv, clustering each class's sample and writing
  report.html again, timed alone.

    python bench/audit_scale.py                 # 10k and 100k rows (about 15 minutes)
    python bench/audit_scale.py --rows 2000 20000 --no-workers

Needs a Redis server for the workers (ONNXCAM_BROKER_URL, default
redis://127.0.0.1:6379/14).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 32
DISTINCT_IMAGES = 256
LABELS = ["cat", "dog", "fox", "owl"]


def build_bundle(workdir: Path) -> Path:
    """A Conv-Relu-Conv-Relu-GAP-Gemm CNN on 32x32 RGB, 4 classes, as a bundle."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxcam.exporter import export

    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["feat"], name="last_relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "audit_scale",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        [weight("w1", (8, 3, 3, 3)), weight("w2", (16, 8, 3, 3)),
         weight("fc", (len(LABELS), 16))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = workdir / "cnn.onnx"
    onnx.save(model, str(source))
    bundle = workdir / "bundle.onnx"
    export(source, bundle, labels=LABELS, preprocess="unit")
    return bundle


def write_manifest(workdir: Path, rows: int) -> Path:
    """``rows`` rows over DISTINCT_IMAGES small PNGs, each row with a label and a box."""
    import numpy as np
    from PIL import Image

    images = workdir / "images"
    if not images.exists():
        images.mkdir()
        rng = np.random.default_rng(1)
        for index in range(DISTINCT_IMAGES):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{index:03d}.png")
    path = workdir / f"manifest-{rows}.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label", "bbox"])
        for row in range(rows):
            x, y = row % 12, (row // 12) % 12
            writer.writerow([str(images / f"{row % DISTINCT_IMAGES:03d}.png"),
                             LABELS[row % len(LABELS)], f"{x} {y} {x + 16} {y + 16}"])
    return path


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(bundle: Path, manifest: Path, out: Path, broker: str | None) -> dict:
    """In a child process: the audit, then the summary and report again, timed."""
    from onnxcam.audit import AuditOptions, LocalBackend, run_audit
    from onnxcam.audit.clusters import SAMPLE
    from onnxcam.audit.report import write_report
    from onnxcam.audit.runner import _add_clusters, _worst_rows
    from onnxcam.audit.summary import summarize
    from onnxcam.progress import Progress

    if broker:
        from onnxcam.audit.distributed import DistributedBackend

        backend = DistributedBackend(broker, model=bundle)
    else:
        from onnxcam.engine import Explainer

        backend = LocalBackend(Explainer(bundle, device="cpu"))
    quiet = open(os.devnull, "w")
    started = time.perf_counter()
    summary = run_audit(manifest, out, backend, AuditOptions(), progress=Progress(0, quiet))
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = summarize(out / "results.csv", classes=list(backend.info.labels))
    _add_clusters(again, out, SAMPLE, list(backend.info.labels))
    write_report(again, out / "report-again.html", _worst_rows(manifest, backend, again, None),
                 out)
    report_seconds = time.perf_counter() - started
    return {"rows": summary.data["n"], "errors": summary.data["errors"],
            "rows_per_s": summary.data["n"] / seconds, "peak_mb": peak_mb(),
            "report_s": report_seconds}


def measure(workdir: Path, rows: int, broker: str | None, env: dict[str, str]) -> dict:
    manifest = write_manifest(workdir, rows)
    out = workdir / f"out-{rows}-{'workers' if broker else 'local'}"
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(workdir / "bundle.onnx"), str(manifest),
         str(out), broker or ""], check=True, capture_output=True, text=True,
        env={**os.environ, **env})
    return json.loads(done.stdout.splitlines()[-1])


def start_workers(workdir: Path, env: dict[str, str], count: int) -> list[subprocess.Popen]:
    workers = []
    for index in range(count):
        log = (workdir / f"worker{index}.log").open("wb")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "onnxcam.cli", "worker", "--concurrency", "1",
             "--loglevel", "WARNING", "--hostname", f"bench{index}@%h"],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))
    time.sleep(8)  # start-up: imports and the broker connection
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--no-workers", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bundle, manifest, out, broker = args.child
        print(json.dumps(one_run(Path(bundle), Path(manifest), Path(out), broker or None)))
        return
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        build_bundle(workdir)
        results = [("local", rows, measure(workdir, rows, None, {})) for rows in args.rows]
        if not args.no_workers:
            broker = os.environ.get("ONNXCAM_BROKER_URL", "redis://127.0.0.1:6379/14")
            import redis

            redis.Redis.from_url(broker).flushdb()
            env = {"ONNXCAM_BROKER_URL": broker, "ONNXCAM_STORE_URL": str(workdir / "store"),
                   "ONNXCAM_ALLOWED_ROOTS": str(workdir / "images"),
                   "ONNXCAM_INLINE_MAX_BYTES": "0"}
            workers = start_workers(workdir, env, 2)
            try:
                rows = min(args.rows)
                results.append(("2 workers", rows, measure(workdir, rows, broker, env)))
            finally:
                for worker in workers:
                    worker.terminate()
                    worker.wait(timeout=60)
    print(f"{'where':<10} {'rows':>8} {'rows/s':>8} {'peak MB':>8} {'report s':>9} {'errors':>7}")
    for where, rows, result in results:
        print(f"{where:<10} {rows:>8} {result['rows_per_s']:>8.1f} {result['peak_mb']:>8.1f} "
              f"{result['report_s']:>9.1f} {result['errors']:>7}")
    local = [result["peak_mb"] for where, _, result in results if where == "local"]
    if len(local) > 1:
        print(f"peak RSS, largest over smallest local run: {max(local) / min(local):.3f}")


if __name__ == "__main__":
    main()

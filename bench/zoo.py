"""Where onnxcam stands on torchvision's zoo (issue 10): one row per model x exporter.

For each pair, two subprocesses (memory and crash isolation, 300 s each):
  1. torch: build the perturbed model, export it (dynamo / legacy at batch 1, or the
     dynamic-batch control), find the usual layer's tensor, and run pytorch-grad-cam;
  2. onnxcam: ``export`` at that layer with verification on, Grad-CAM on the same
     images and targets, then the default layer (exported too when it differs).
The onnxcam child measures its own peak RSS, so torch's memory is not counted.

    python bench/zoo.py [--models resnet18,vgg11] [--exporters dynamo,legacy]
                        [--quick] [--no-default-export] [--json results.jsonl]
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

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # both sides on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402  (tests/zoo.py, the shared zoo)

TIMEOUT_S = 300
# The onnxcam child's address space: swin_t's fd fallback reached 18 GB on a 23 GB
# machine shared with others; the budget is 2 GB, so past 8 GB is a failure.
MEMORY_CAP = 8 << 30
QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "swin_t")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- children


def torch_side(name: str, exporter: str, work: Path) -> dict[str, Any]:
    """Child 1: export with torch, name the usual layer, pytorch-grad-cam's maps."""
    import numpy as np

    entry = zoo.ZOO[name]
    model = entry.model()
    start = time.perf_counter()
    try:
        path = zoo.export_torch(entry, model, exporter, work / "model.onnx")
    except Exception as exc:
        return {"torch_export": False, "torch_error": first_line(exc)}
    row: dict[str, Any] = {"torch_export": True, "torch_s": time.perf_counter() - start}
    example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    row["usual_tensor"] = zoo.onnx_layer_name(path, model, entry.layer, example)
    expected = zoo.reference(entry, model, zoo.images(entry.size))
    np.save(work / "reference.npy", expected.maps)
    row["targets"] = list(expected.targets)
    row["reference_cells"] = [int(n) for n in (expected.maps > 0).sum(axis=(1, 2))]
    return row


def onnxcam_side(name: str, exporter: str, work: Path, default_export: bool
                 ) -> dict[str, Any]:
    """Child 2: onnxcam's export at the usual layer, its map error, the default layer."""
    import numpy as np

    from onnxcam import export
    from onnxcam.exporter import describe, list_layers

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    entry = zoo.ZOO[name]
    source = work / "model.onnx"
    torch_row = json.loads((work / "torch.json").read_text())
    usual, targets = torch_row["usual_tensor"], tuple(torch_row["targets"])
    row: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        result = export(source, work / "usual.onnx", layer=usual, preprocess=zoo.PREPROCESS)
        row.update(onnxcam_export=True, gradient=result.info.gradient,
                   onnxcam_layer=result.info.target_layer)
    except Exception as exc:
        row.update(onnxcam_export=False, onnxcam_error=first_line(exc))
    row["onnxcam_s"] = time.perf_counter() - start
    row["peak_mb"] = peak_mb()
    if row["onnxcam_export"]:
        batch = zoo.images(entry.size)
        ours = zoo.onnxcam_maps(work / "usual.onnx", batch, targets)
        row["map_error"] = zoo.map_error(ours, np.load(work / "reference.npy"))
    try:
        layers = list_layers(source)
        starred = next(line for line in describe(layers) if line.startswith("*"))
        default = next(layer for layer in layers if layer.name == starred.split()[1])
        row["default_layer"] = default.name
        row["default_is_usual"] = usual in (default.name, default.tensor)
    except Exception as exc:
        row["default_error"] = first_line(exc)
        return row
    if not row["default_is_usual"] and default_export:
        start = time.perf_counter()
        try:
            result = export(source, work / "default.onnx", preprocess=zoo.PREPROCESS)
            row.update(default_export=True, default_gradient=result.info.gradient)
        except Exception as exc:
            row.update(default_export=False, default_export_error=first_line(exc))
        row["default_s"] = time.perf_counter() - start
    return row


def child(side: str, name: str, exporter: str, work: Path, default_export: bool) -> None:
    """Run one side and write its row (or its first-line error) to ``work/<side>.json``."""
    try:
        row = torch_side(name, exporter, work) if side == "torch" else \
            onnxcam_side(name, exporter, work, default_export)
    except Exception as exc:
        row = {f"{side}_failed": first_line(exc)}
    (work / f"{side}.json").write_text(json.dumps(row))


# --------------------------------------------------------------------------- parent


def run_side(side: str, name: str, exporter: str, work: Path, default_export: bool
             ) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", side, name, exporter, str(work)]
    if not default_export:
        command.append("--no-default-export")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {f"{side}_failed": f"timeout after {TIMEOUT_S} s"}
    out = work / f"{side}.json"
    if out.exists():
        return json.loads(out.read_text())
    tail = (done.stderr or done.stdout).strip().splitlines()
    return {f"{side}_failed": f"exit {done.returncode}: {tail[-1] if tail else ''}"[:300]}


def measure(name: str, exporter: str, default_export: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "exporter": exporter, "size": zoo.ZOO[name].size,
                           "layer": zoo.ZOO[name].layer}
    with tempfile.TemporaryDirectory(prefix=f"zoo_{name}_") as folder:
        work = Path(folder)
        row.update(run_side("torch", name, exporter, work, default_export))
        if "usual_tensor" in row:
            row.update(run_side("onnxcam", name, exporter, work, default_export))
    return row


def cell(row: dict[str, Any]) -> list[str]:
    torch_ok = "yes" if row.get("torch_export") else f"no ({row.get('torch_error', '')})"
    if "torch_failed" in row:
        torch_ok += f"; {row['torch_failed']}"
    if row.get("onnxcam_export"):
        onnxcam = "ok"
    else:
        onnxcam = row.get("onnxcam_error") or row.get("onnxcam_failed") or "-"
    error = row.get("map_error")
    default = row.get("default_layer", row.get("default_error", "-"))
    if "default_is_usual" in row:
        default = ("= usual" if row["default_is_usual"] else f"{default}")
        if row.get("default_export") is False:
            default += f" (export: {row['default_export_error'][:80]})"
    return [row["model"], row["exporter"], torch_ok[:120], onnxcam[:120].replace("|", "/"),
            f"{row['onnxcam_s']:.1f}" if "onnxcam_s" in row else "-",
            f"{row['peak_mb']:.0f}" if "peak_mb" in row else "-",
            row.get("gradient", "-"),
            "-" if error is None else f"{error:.1e}", default.replace("|", "/")]


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "exporter", "torch export", "onnxcam export (usual layer)", "s",
            "peak MB", "gradient", "map error", "default layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(row)) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated; default: the whole zoo")
    parser.add_argument("--exporters", default=",".join(zoo.EXPORTERS))
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_MODELS)} only, and --no-default-export")
    parser.add_argument("--no-default-export", action="store_true",
                        help="name the default layer, but do not export at it where it is "
                             "not the usual one")
    parser.add_argument("--json", type=Path, help="append one JSON line per row here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, name, exporter, work = args.child
        child(side, name, exporter, Path(work), not args.no_default_export)
        return
    models = [m for m in args.models.split(",") if m] or \
        (list(QUICK_MODELS) if args.quick else list(zoo.ZOO))
    rows = []
    for name in models:
        for exporter in [e for e in args.exporters.split(",") if e]:
            row = measure(name, exporter, not (args.quick or args.no_default_export))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.json:
                with args.json.open("a") as stream:
                    stream.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Where onnxcam stands on torchvision's zoo (issue 10): one row per model x exporter.

Subprocesses for memory and crash isolation (300 s per export):
  1. torch, once per model: build the perturbed model, run pytorch-grad-cam, export it
     each way (dynamo / legacy at batch 1, and the dynamic-batch control) and find
     the usual layer's tensor in each file;
  2. onnxcam, once per export: ``export`` at that layer with verification on,
     Grad-CAM on the same images and targets, then the default layer (exported too
     when it differs).
The onnxcam child measures its own peak RSS, so torch's memory is not counted.

    python bench/torch_zoo.py [--models resnet18,vgg11] [--exporters dynamo,legacy]
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


def torch_side(name: str, exporters: list[str], work: Path) -> None:
    """Child 1, once per model: each export, the usual layer in it, pytorch-grad-cam's maps.

    Writes ``work/<exporter>/torch.json`` (and ``model.onnx``) per exporter, and the
    reference maps, the same for every exporter, to ``work/reference.npy``.
    """
    import numpy as np

    entry = zoo.ZOO[name]
    model = entry.model()
    expected = zoo.reference(entry, model, zoo.images(entry.size))
    np.save(work / "reference.npy", expected.maps)
    example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    for exporter in exporters:
        folder = work / exporter
        folder.mkdir(exist_ok=True)
        start = time.perf_counter()
        try:
            path = zoo.export_torch(entry, model, exporter, folder / "model.onnx")
            row: dict[str, Any] = {"torch_export": True, "torch_s": time.perf_counter() - start}
            row["usual_tensor"] = zoo.onnx_layer_name(path, model, entry.layer, example)
        except Exception as exc:
            row = {"torch_export": (folder / "model.onnx").exists(),
                   "torch_error": first_line(exc)}
        row["targets"] = list(expected.targets)
        row["reference_cells"] = [int(n) for n in (expected.maps > 0).sum(axis=(1, 2))]
        (folder / "torch.json").write_text(json.dumps(row))


def onnxcam_side(name: str, exporter: str, work: Path, default_export: bool
                 ) -> dict[str, Any]:
    """Child 2: onnxcam's export at the usual layer, its map error, the default layer."""
    import numpy as np

    from onnxcam import export
    from onnxcam.exporter import describe, list_layers

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    entry = zoo.ZOO[name]
    source = work / exporter / "model.onnx"
    torch_row = json.loads((work / exporter / "torch.json").read_text())
    usual, targets = torch_row["usual_tensor"], tuple(torch_row["targets"])
    row: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        result = export(source, work / exporter / "usual.onnx", layer=usual,
                        preprocess=zoo.PREPROCESS)
        row.update(onnxcam_export=True, gradient=result.info.gradient,
                   onnxcam_layer=result.info.target_layer)
        if result.report is not None:  # the JSON rows only: (tensor, error, tolerance)
            row["verify_worst"] = list(result.report.worst)
    except Exception as exc:
        row.update(onnxcam_export=False, onnxcam_error=first_line(exc))
    row["onnxcam_s"] = time.perf_counter() - start
    row["peak_mb"] = peak_mb()
    if row["onnxcam_export"]:
        batch = zoo.images(entry.size)
        ours = zoo.onnxcam_maps(work / exporter / "usual.onnx", batch, targets)
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
            result = export(source, work / exporter / "default.onnx", preprocess=zoo.PREPROCESS)
            row.update(default_export=True, default_gradient=result.info.gradient)
        except Exception as exc:
            row.update(default_export=False, default_export_error=first_line(exc))
        row["default_s"] = time.perf_counter() - start
    return row


def child(side: str, name: str, exporters: str, work: Path, default_export: bool) -> None:
    """Run one side; a crash leaves its first-line error in ``work/<side>.error``."""
    try:
        if side == "torch":
            torch_side(name, exporters.split(","), work)
        else:
            row = onnxcam_side(name, exporters, work, default_export)
            (work / exporters / "onnxcam.json").write_text(json.dumps(row))
    except Exception as exc:
        (work / f"{side}.error").write_text(first_line(exc))


# --------------------------------------------------------------------------- parent


def run_side(side: str, name: str, exporters: list[str], work: Path, default_export: bool
             ) -> str:
    """Run one child; '' when it finished, else why not (timeout, crash, error)."""
    command = [sys.executable, __file__, "--child", side, name, ",".join(exporters), str(work)]
    if not default_export:
        command.append("--no-default-export")
    timeout = TIMEOUT_S * len(exporters)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout} s"
    error = work / f"{side}.error"
    if error.exists():
        return error.read_text()
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return f"exit {done.returncode}: {tail[-1] if tail else ''}"[:300]
    return ""


def measure(name: str, exporters: list[str], default_export: bool) -> list[dict[str, Any]]:
    """One row per exporter: one torch child for the model, one onnxcam child per export."""
    entry = zoo.ZOO[name]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"zoo_{name}_") as folder:
        work = Path(folder)
        torch_failed = run_side("torch", name, exporters, work, default_export)
        for exporter in exporters:
            row: dict[str, Any] = {"model": name, "exporter": exporter, "size": entry.size,
                                   "layer": entry.layer}
            done = work / exporter / "torch.json"
            if not done.exists():
                rows.append({**row, "torch_failed": torch_failed or "no result"})
                continue
            row.update(json.loads(done.read_text()))
            if "usual_tensor" in row:
                failed = run_side("onnxcam", name, [exporter], work, default_export)
                result = work / exporter / "onnxcam.json"
                row.update(json.loads(result.read_text()) if result.exists() and not failed
                           else {"onnxcam_failed": failed or "no result"})
                (work / "onnxcam.error").unlink(missing_ok=True)
            rows.append(row)
    return rows


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
    exporters = [e for e in args.exporters.split(",") if e]
    rows = []
    for name in models:
        for row in measure(name, exporters, not (args.quick or args.no_default_export)):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.json:
                with args.json.open("a") as stream:
                    stream.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

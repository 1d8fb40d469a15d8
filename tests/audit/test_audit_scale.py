"""Memory stays flat as the manifest grows: the same audit at 200 and 2,000 rows, each
in a fresh process, must reach nearly the same peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import manifest_rows, write_manifest

ROOT = Path(__file__).resolve().parents[2]

MEASURE = """
import json, sys
from pathlib import Path
from onnxcam.engine import Explainer
from onnxcam.audit import AuditOptions, LocalBackend, run_audit
from onnxcam.progress import Progress

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

bundle, warm, manifest, out = sys.argv[1:5]
backend = LocalBackend(Explainer(bundle, device="cpu"))
quiet = open("/dev/null", "w")
# Every class exceeds this clusters' sample at both sizes (20 rows a class warm, then
# 40 and 400): the clustering's memory is bounded by its sample, not by the class.
options = AuditOptions(clusters_sample=20)
run_audit(Path(warm), Path(out) / "warm", backend, options, Progress(0, quiet))
before = status("VmRSS:")
summary = run_audit(Path(manifest), Path(out) / "audit", backend, options, Progress(0, quiet))
print(json.dumps({"before": before, "peak": status("VmHWM:"), "n": summary.data["n"],
                  "seconds": summary.data["seconds"]}))
"""


def measure(bundle: Path, warm: Path, manifest: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(bundle), str(warm),
                           str(manifest), str(out)], check=True, env=env,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_is_flat_from_200_to_2000_rows(tmp_path: Path, image_folder: Path,
                                                    audit_bundle: Path) -> None:
    rows = manifest_rows(image_folder, 2000)
    warm = write_manifest(tmp_path / "warm.csv", rows[:100])
    small = measure(audit_bundle, warm, write_manifest(tmp_path / "small.csv", rows[:200]),
                    tmp_path / "small")
    large = measure(audit_bundle, warm, write_manifest(tmp_path / "large.csv", rows),
                    tmp_path / "large")
    assert (small["n"], large["n"]) == (200, 2000)
    growth = large["peak"] - small["peak"]
    print(f"peak RSS {small['peak']:.1f} MB at 200 rows, {large['peak']:.1f} MB at 2000 rows; "
          f"{2000 / large['seconds']:.0f} rows/s")
    assert growth < 8, f"peak RSS grew {growth:.1f} MB from 200 to 2000 rows"

"""The README's quick start runs as written, from a copy of the repository's examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from service import redis_url

REPO = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Quick start"):]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "the quick start has no command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_names_only_files_that_ship() -> None:
    for line in quick_start_lines():
        for word in re.findall(r"examples/[\w./-]+", line):
            assert (REPO / word).exists(), f"{word} (in {line!r}) does not ship"


@pytest.mark.slow
@pytest.mark.tf
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    lines = [line for line in quick_start_lines() if not line.startswith("pip install")]
    # The script as a user pastes it; the worker started with '&' is stopped at the end.
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + "\n".join(lines)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "ONNXCAM_BROKER_URL": redis_url(7),
           "ONNXCAM_STORE_URL": str(tmp_path / "store"), "ONNXCAM_DEVICE": "cpu",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # explain --json: one record for the snow bus, which the model calls a bus.
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    (explained,) = [r for r in records if r["image"].endswith("bus_snow_00.png")]
    assert explained["target"] == 0  # bus, the model's top class for a bus on snow
    heatmap = np.load(tmp_path / "heatmaps" / "bus_snow_00.npy")
    assert heatmap.shape == (64, 64) and 0 <= heatmap.min() and heatmap.max() <= 1
    # The worker's maps for the two submitted images, fetched by result.
    assert {p.name for p in (tmp_path / "results").glob("*.npy") if ".raw" not in p.name} == {
        "bus_grass_00.npy", "car_snow_00.npy"}
    # The exported bundle gives the shipped bundle's map for the same image.
    shipped = subprocess.run(
        [f"{bin_dir}/onnxcam", "explain", "examples/shortcut/model.onnx",
         "examples/shortcut/images/bus_snow_00.png", "--out", "shipped"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert shipped.returncode == 0
    np.testing.assert_allclose(heatmap, np.load(tmp_path / "shipped" / "bus_snow_00.npy"),
                               atol=1e-3)
    assert (tmp_path / "audit-out" / "report.html").exists()

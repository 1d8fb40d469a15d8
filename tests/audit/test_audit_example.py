"""The shipped example audits without TensorFlow, flags the snow shortcut, and its
report renders in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shortcut"
# The CLI with TensorFlow made unimportable: the example must need only the slim install.
WITHOUT_TF = ("import sys; sys.modules['tensorflow'] = None; sys.argv[0] = 'onnxcam'; "
              "from onnxcam.cli import main; main()")


@pytest.fixture(scope="module")
def example_audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shortcut") / "audit-out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", WITHOUT_TF, "audit",
                          "examples/shortcut/manifest.csv", "--model",
                          "examples/shortcut/model.onnx", "--out", str(out)],
                         check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    (out.parent / "stdout.txt").write_text(run.stdout)
    return out


def test_the_example_flags_bus_and_not_car(example_audit: Path) -> None:
    summary = json.loads((example_audit / "summary.json").read_text())
    assert (summary["n"], summary["errors"]) == (60, 0)
    assert [flag["class"] for flag in summary["flags"]] == ["bus"]
    assert summary["flags"][0]["reason"] == "attention mostly outside the object"
    bus, car = summary["per_class"]["bus"], summary["per_class"]["car"]
    # Buses are found on snow only (all ten), cars everywhere.
    assert bus["accuracy"] < 0.7 and car["accuracy"] == 1.0
    assert 0.7 < summary["accuracy"] < 0.85
    # The ten buses on grass have empty maps: no evidence for bus anywhere. Left out,
    # the other twenty buses' maps lie on the snow, barely above a uniform map.
    assert (bus["empty_maps"], car["empty_maps"]) == (10, 0)
    assert bus["energy_in_box_mean"] < 1.5 * bus["box_area_mean"] < 0.3
    assert car["energy_in_box_mean"] > 0.5 and car["pointing_hit_rate"] > 0.6
    rows = (example_audit / "results.csv").read_text().splitlines()[1:]
    on_grass = [row for row in rows if "bus_grass" in row]
    assert len(on_grass) == 10 and all(",bus,car," in row for row in on_grass)
    # Their energy and pointing cells stay 0 and 0 (results.csv is unchanged).
    assert all(row.split(",")[5:7] == ["0.0000", "0"] for row in on_grass)


def test_the_example_advises_on_the_bus_background(example_audit: Path) -> None:
    summary = json.loads((example_audit / "summary.json").read_text())
    assert [(a["class"], a["rule"]) for a in summary["advice"]] == [
        ("bus", "background"), ("bus", "empty")]
    # The snowy buses are mostly right (the shortcut works on snow).
    assert summary["flags"][0]["accuracy_located"] > 0.8
    stdout = (example_audit.parent / "stdout.txt").read_text()
    assert ("advice: bus: attention mostly outside the object, predictions mostly right: "
            "the model is right about bus while looking away from it, at the background: "
            "it may have learned the background (or the context), not the bus. Try: "
            "collect bus images on other backgrounds, or crop or mask the backgrounds in "
            "training, and re-audit.") in stdout
    report = (example_audit / "report.html").read_text()
    assert "What to try" in report and "collect bus images on other backgrounds" in report
    # car's two clusters both look at the car (energy in box 0.50 and 0.87 over box
    # areas of 0.15): no cluster is explained by the background.
    clusters = summary["clusters"]
    assert clusters["background"] == [] and clusters["per_class"]["car"]["k"] == 2
    assert all(c["energy_in_box_mean"] > 3 * c["box_area_mean"]
               for c in clusters["per_class"]["car"]["clusters"])
    assert "images are explained by the background" not in report


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless Chromium")
def test_the_report_renders_in_headless_chromium(example_audit: Path, tmp_path: Path) -> None:
    picture = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", f"--screenshot={picture}",
                    "--window-size=1200,1800", (example_audit / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(np.int16)
    assert pixels.shape == (1800, 1200, 3)
    assert pixels.std() > 20, "the page rendered blank"
    # The flag banner is red, near the top, at a glance.
    red, green, blue = pixels[:400, ..., 0], pixels[:400, ..., 1], pixels[:400, ..., 2]
    assert ((red > 150) & (green < 80) & (blue < 80)).sum() > 500
    # The worst-case overlays further down are colourful pictures, not placeholders.
    lower = pixels[900:]
    assert (np.abs(lower - lower.mean(axis=-1, keepdims=True)).max(axis=-1) > 60).sum() > 20000

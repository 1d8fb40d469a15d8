"""Multi-label and segmentation audits over two real ``onnxcam worker`` processes and a
private Redis give the in-process audit's lines and numbers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, write_manifest
from PIL import Image
from service import free_port, service_env, start_redis, start_worker
from test_audit_targets import pairs_manifests, palette_png

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SAME = ("image", "label", "pred", "correct", "pointing_hit", "status", "error", "explained",
        "row")
NUMBERS = ("score", "energy_in_box", "box_area")


def audit(*args: str | Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "onnxcam.cli", "audit", *map(str, args)],
                          env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def lines(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def segmentation_manifest(folder: Path, images: Path) -> Path:
    rng = np.random.default_rng(5)
    rows = []
    for name in "abcdef":
        size = Image.open(images / f"{name}.png").size[::-1]
        ids = rng.choice([1, 3, 255], size=size).astype(np.uint8)
        ids[: size[0] // 2] = 4  # a class in a block, the others scattered
        rows.append([str(images / f"{name}.png"), str(palette_png(folder / f"{name}.png", ids))])
    return write_manifest(folder / "seg.csv", rows, header=("image", "segmentation"))


def test_distributed_multi_label_and_segmentation_audits(
        tmp_path: Path, image_folder: Path, audit_bundle: Path) -> None:
    (tmp_path / "masks").mkdir()
    manifests = {"multi": pairs_manifests(tmp_path, image_folder)[0],
                 "seg": segmentation_manifest(tmp_path / "masks", image_folder)}
    redis = start_redis(tmp_path, free_port())
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", tmp_path / "store", image_folder)
    workers = [start_worker(f"w{n}", env, tmp_path) for n in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready()
        for name, manifest in manifests.items():
            audit(manifest, "--model", audit_bundle, "--out", tmp_path / f"{name}-local",
                  env=env)
            audit(manifest, "--model", audit_bundle, "--out", tmp_path / f"{name}-remote",
                  "--broker", env["ONNXCAM_BROKER_URL"], "--chunk-size", "2", env=env)
    finally:
        for worker in workers:
            worker.stop()
        redis.stop()
    for name in manifests:
        local, remote = lines(tmp_path / f"{name}-local"), lines(tmp_path / f"{name}-remote")
        assert len(local) == len(remote) > len({line["row"] for line in local})
        for mine, theirs in zip(local, remote):
            assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}
            for key in NUMBERS:
                if mine[key] or theirs[key]:
                    assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=1e-4), key
            assert theirs["heatmap"].startswith(str(tmp_path / "store"))
    seg = lines(tmp_path / "seg-remote")
    assert {line["label"] for line in seg} == {LABELS[1], LABELS[3], LABELS[4]}
    # Both workers took chunks.
    assert all("succeeded" in worker.text() for worker in workers)

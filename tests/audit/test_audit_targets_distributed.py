"""Multi-label and segmentation audits over two real ``onnxcam worker`` processes and a
private Redis give the in-process audit's lines and numbers."""

from __future__ import annotations

import csv
import json
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
NUMBERS = ("score", "energy_in_box", "box_area", "deletion_auc", "insertion_auc")


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
        tmp_path: Path, image_folder: Path, audit_bundle: Path, multilabel_bundle: Path) -> None:
    (tmp_path / "masks").mkdir()
    multi = pairs_manifests(tmp_path, image_folder)[0]
    seg = segmentation_manifest(tmp_path / "masks", image_folder)
    # name: manifest, bundle, options. The softmax bundle's all-positive finds no class
    # over 0.5 in any image (each row's pred from its record's logits all the same); at
    # 0.77 the sigmoid one finds a class in some images and none in others.
    audits = {"multi": (multi, audit_bundle, ()), "seg": (seg, audit_bundle, ()),
              "pred": (multi, audit_bundle, ("--explain", "pred")),
              "ml-pred": (multi, multilabel_bundle, ("--explain", "pred", "--threshold", "0.77")),
              "seg-pred": (seg, multilabel_bundle, ("--explain", "pred", "--faithfulness"))}
    redis = start_redis(tmp_path, free_port())
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", tmp_path / "store", image_folder)
    workers = [start_worker(f"w{n}", env, tmp_path) for n in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready()
        for name, (manifest, bundle, options) in audits.items():
            audit(manifest, "--model", bundle, "--out", tmp_path / f"{name}-local", *options,
                  env=env)
            audit(manifest, "--model", bundle, "--out", tmp_path / f"{name}-remote", *options,
                  "--broker", env["ONNXCAM_BROKER_URL"], "--chunk-size", "2", env=env)
    finally:
        for worker in workers:
            worker.stop()
        redis.stop()
    for name in audits:
        local, remote = lines(tmp_path / f"{name}-local"), lines(tmp_path / f"{name}-remote")
        assert len(local) == len(remote) >= len({line["row"] for line in local}), name
        for mine, theirs in zip(local, remote):
            assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}, name
            for key in NUMBERS:
                if mine.get(key) or theirs.get(key):
                    assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=1e-4), key
            if theirs["explained"]:
                assert theirs["heatmap"].startswith(str(tmp_path / "store"))
        assert json_of(tmp_path / f"{name}-remote")["threshold"] == json_of(
            tmp_path / f"{name}-local")["threshold"]
    seg_lines = lines(tmp_path / "seg-remote")
    assert {line["label"] for line in seg_lines} == {LABELS[1], LABELS[3], LABELS[4]}
    pred = lines(tmp_path / "pred-remote")
    assert [(line["row"], line["explained"]) for line in pred] == [(str(row), "") for row in
                                                                    range(4)]
    assert all(line["pred"] for line in pred)  # the softmax top-1, from the records
    explained = {line["row"] for line in lines(tmp_path / "ml-pred-remote") if line["explained"]}
    assert 0 < len(explained) < 4
    assert any(line["deletion_auc"] for line in lines(tmp_path / "seg-pred-remote"))
    # Each row's image went to the workers once: a job's entries are its chunk's rows,
    # each with its list of targets (no top-1 job for the images all-positive skipped).
    store = tmp_path / "store" / "jobs"
    requests = [json.loads(path.read_text()) for path in store.glob("*/request.json")]
    assert all(isinstance(entry, list) for r in requests for entry in r["targets"])
    rows = [len({line["row"] for line in lines(tmp_path / f"{name}-local")}) for name in audits]
    assert len(requests) == sum(-(-count // 2) for count in rows)  # a job per chunk of two
    multi_jobs = [r for r in requests if isinstance(r["targets"][0], list)]
    assert sorted(len(r["images"]) for r in multi_jobs if r["targets"][0] == [
        LABELS.index("cat"), LABELS.index("dog")]) == [2]
    # Both workers took chunks.
    assert all("succeeded" in worker.text() for worker in workers)


def json_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())

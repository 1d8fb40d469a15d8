"""A detection bundle end to end: a private redis-server, a real ``onnxcam worker``, the
``submit`` and ``result`` commands; each detection's stored map held against the
in-process engine's for the same detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from checks import assert_close
from click.testing import CliRunner
from PIL import Image
from service import free_port, service_env, settings_for, start_redis, start_worker, wait_for
from tiny_detectors import tiny_yolo

import onnxcam
from onnxcam.cli import main
from onnxcam.engine import Explainer
from onnxcam.worker.client import celery_status
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow


def test_a_detection_job_through_the_commands(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(12)
    paths = []
    for index, (height, width) in enumerate([(24, 40), (20, 12)]):
        paths.append(root / f"img{index}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(paths[-1])
    bundle = tmp_path / "tiny.cam.onnx"
    onnxcam.export(tiny_yolo(seed=4), bundle, preprocess="unit")
    redis = start_redis(tmp_path, free_port(), aof=False)
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", tmp_path / "store", root)
    worker = start_worker("detections", env, tmp_path)
    try:
        worker.wait_ready()
        runner = CliRunner()
        refused = runner.invoke(main, ["submit", str(bundle), str(paths[0]),
                                       "--max-detections", "0"], env=env)
        assert refused.exit_code == 2 and "--max-detections" in refused.output
        queued = runner.invoke(main, ["submit", str(bundle), *map(str, paths),
                                      "--max-detections", "3", "--target", "top:2",
                                      "--target", "dog"], env=env)
        assert queued.exit_code == 0, queued.output
        (job_id,) = queued.stdout.split()
        wait_for(lambda: celery_status(job_id, settings_for(env)) in ("done", "failed"), 60,
                 job_id)
        out = tmp_path / "out"
        done = runner.invoke(main, ["result", job_id, "--out", str(out), "--json"], env=env)
        assert done.exit_code == 0, done.output
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        store = Store(settings_for(env).store_url)
        request = json.loads(store.get(f"jobs/{job_id}/request.json"))
        assert request["max_detections"] == 3
        assert "Traceback" not in worker.text()
    finally:
        worker.stop()
        redis.stop()
    expected = Explainer(bundle, device="cpu").explain(
        [str(p) for p in paths], targets=[["top:2", "dog"]] * 2, max_detections=3)
    assert [(r["index"], r["target_name"]) for r in rows] == list(zip(
        expected.image_index.tolist(), expected.target_names))
    assert len(rows) >= 4  # two best per image, and any dog among its three
    for position, (row, found) in enumerate(zip(rows, expected.detections)):
        assert (row["anchor"], row["class"], row["rank"]) == (found.anchor, found.cls,
                                                              found.rank)
        stem = out / f"img{row['index']}.{found.rank}.{found.label}"
        assert_close(np.load(f"{stem}.raw.npy"), expected.raw[position], 1e-6, "raw map")
        height, width = [(24, 40), (20, 12)][row["index"]]
        assert np.load(f"{stem}.npy").shape == (height, width) == tuple(row["image_size"])
        assert json.loads(Path(f"{stem}.json").read_text())["target_name"] == found.name

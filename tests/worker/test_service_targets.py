"""Many targets per image end to end: a private redis-server, a real ``onnxcam worker``
with ONNXCAM_SIGNING_KEY set (every job here is signed, the new fields included), the
client and the ``submit`` and ``result`` commands; rows held against the engine."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import models
import numpy as np
import pytest
from checks import assert_close
from click.testing import CliRunner
from poison import QUEUE, envelope
from service import (
    free_port,
    service_env,
    settings_for,
    start_redis,
    start_worker,
    wait_for,
    write_noise_images,
)

from onnxcam.cli import main
from onnxcam.engine import Explainer
from onnxcam.engine.targets import Contrast
from onnxcam.exporter import export
from onnxcam.worker.client import _app, celery_status, job_error, send, submit
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.signing import signed
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow
KEY = "0123456789abcdef-targets-key"
ONE_CLASS_KEYS = {"job", "index", "image", "status", "bundle", "method", "target", "label",
                  "logits", "top", "flat", "image_size", "files", "timings"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("service-targets")
    root = folder / "images"
    paths = write_noise_images(root, 3)
    bundle = folder / "skip.cam.onnx"
    export(models.onnx_skip_head(), bundle, layer="last_relu", head="sigmoid")
    redis = start_redis(folder, free_port(), aof=False)
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", folder / "store", root,
                      signing_key=KEY)
    worker = start_worker("targets", env, folder)
    try:
        worker.wait_ready()
        yield {"env": env, "settings": settings_for(env), "images": paths, "bundle": bundle,
               "worker": worker, "folder": folder}
    finally:
        worker.stop()
        redis.stop()


def finished(job_id: str, settings: Any) -> None:
    """Wait on Celery's state alone: ``result --wait`` within a minute of this private
    Redis's start may take a job being handed out for lost (see the report)."""
    wait_for(lambda: celery_status(job_id, settings) in ("done", "failed"), 60, job_id)


def stored(store: Store, row: dict[str, Any], kind: str) -> np.ndarray:
    return np.load(io.BytesIO(store.get(store.owns(row["files"][kind]))))


def test_all_positive_over_three_images(deployment: dict[str, Any]) -> None:
    settings, paths = deployment["settings"], deployment["images"]
    job = submit(deployment["bundle"], paths, targets="all-positive", threshold=0.45,
                 settings=settings)
    finished(job.ids[0], settings)
    rows = job.wait(timeout=60)
    expected = Explainer(deployment["bundle"], device="cpu").explain(
        [str(p) for p in paths], targets="all-positive", threshold=0.45)
    assert [(r["index"], r["target"], r["target_name"]) for r in rows] == list(zip(
        expected.image_index.tolist(), expected.targets.tolist(), expected.target_names))
    assert len(rows) > 3
    store = Store(settings.store_url)
    for position, row in enumerate(rows):
        assert_close(row["logits"], expected.logits[position], 1e-6, "logits")
        assert_close(stored(store, row, "raw"), expected.raw[position], 1e-6, "raw map")
        assert_close(stored(store, row, "heatmap"), expected.heatmaps[position], 1e-3,
                     "heatmap (float16 in the store)")


def test_a_contrast_job_through_the_commands(deployment: dict[str, Any],
                                             tmp_path: Path) -> None:
    env, paths = deployment["env"], deployment["images"]
    runner = CliRunner()
    queued = runner.invoke(main, ["submit", str(deployment["bundle"]), str(paths[0]),
                                  "--target", "3", "--contrast", "0:1"], env=env)
    assert queued.exit_code == 0, queued.output
    (job_id,) = queued.stdout.split()
    finished(job_id, deployment["settings"])
    done = runner.invoke(main, ["result", job_id, "--out", str(tmp_path), "--json"], env=env)
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["target_name"] for r in rows] == ["3", "0-vs-1"]
    expected = Explainer(deployment["bundle"], device="cpu").explain(
        str(paths[0]), targets=[[3, Contrast(0, 1)]])
    for position, name in enumerate(["3", "0-vs-1"]):
        assert_close(np.load(tmp_path / f"img0.{name}.raw.npy"), expected.raw[position],
                     1e-6, name)
        assert json.loads((tmp_path / f"img0.{name}.json").read_text())["target_name"] == name
    assert not (tmp_path / "img0.npy").exists()


def test_an_old_form_message_is_unchanged(deployment: dict[str, Any], tmp_path: Path) -> None:
    env, paths = deployment["env"], deployment["images"]
    runner = CliRunner()
    queued = runner.invoke(main, ["submit", str(deployment["bundle"]), *map(str, paths[:2]),
                                  "--target", "2"], env=env)
    (job_id,) = queued.stdout.split()
    finished(job_id, deployment["settings"])
    store = Store(deployment["settings"].store_url)
    request = json.loads(store.get(f"jobs/{job_id}/request.json"))
    assert request["targets"] == [2, 2] and "threshold" not in request
    done = runner.invoke(main, ["result", job_id, "--out", str(tmp_path), "--json"], env=env)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [set(r) for r in rows] == [ONE_CLASS_KEYS] * 2 and {r["target"] for r in rows} == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"img{i}{suffix}" for i in range(2) for suffix in (".npy", ".png", ".raw.npy", ".json"))
    assert sorted(store.names(f"jobs/{job_id}/")) == sorted(
        [f"{i:05d}{suffix}" for i in range(2) for suffix in (".npy", ".png", ".raw.npy",
                                                             ".json")]
        + ["request.json", "request.sha256", "starts.json", "summary.json"])


def test_bad_targets_then_a_good_job(deployment: dict[str, Any]) -> None:
    settings, paths = deployment["settings"], deployment["images"]
    store = Store(settings.store_url)
    sha = store.put_bundle(deployment["bundle"].read_bytes())
    bad = [{"contrast": [0]}, "top:99", "x" * 100_000, [0] * 1001, {"weights": [1.0]}]
    spec = JobSpec("job-bad-targets", sha, [ImageRef("img0.png", path=str(paths[0]))] * 5,
                   "gradcam", bad)
    send(_app(settings), spec, store, settings.signing_keys)
    job = submit(deployment["bundle"], paths[:1], targets=[["top:2", 5]], settings=settings)
    finished(job.ids[0], settings)
    rows = job.wait(timeout=60)
    assert [r["target"] for r in rows][2] == 5 and len(rows) == 3
    wait_for(lambda: celery_status("job-bad-targets", settings) == "done", 30, "the bad job")
    records = [json.loads(store.get(f"jobs/job-bad-targets/{i:05d}.json")) for i in range(5)]
    assert [r["error"]["code"] for r in records] == ["bad_target"] * 5
    assert all(len(r["error"]["message"]) < 600 for r in records)
    assert "Traceback" not in deployment["worker"].text()


def test_a_changed_threshold_breaks_the_signature(deployment: dict[str, Any]) -> None:
    settings, paths = deployment["settings"], deployment["images"]
    store = Store(settings.store_url)
    sha = store.put_bundle(deployment["bundle"].read_bytes())
    spec = JobSpec("job-tampered", sha, [ImageRef("img0.png", path=str(paths[0]))],
                   "gradcam", ["all-positive"], threshold=0.9)
    message = {**signed(spec.job_id, spec.to_message(), KEY.encode()), "threshold": 0.1}
    import redis

    redis.Redis.from_url(settings.broker_url).lpush(QUEUE, json.dumps(
        envelope(message, spec.job_id)))
    wait_for(lambda: celery_status(spec.job_id, settings) == "failed", 30, "the refusal")
    assert job_error(spec.job_id, store, settings)["code"] == "bad_signature"  # type: ignore[index]

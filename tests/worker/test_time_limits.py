"""Time limits that hold, on a real worker: the soft limit stops a job between
batches and keeps what it stored; a hard kill leaves ``time_limit`` behind too, even
when the message asks Celery for limits of its own."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from service import redis_url, service_env, settings_for, start_worker, wait_for

from onnxcam.engine.explainer import DEFAULT_BATCH
from onnxcam.worker.client import _app, job_records, job_status, submit
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.records import write_request
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow
BATCH = DEFAULT_BATCH["cpu"]


def gradients(folder: Path, count: int, side: int) -> list[Path]:
    """Images whose maps take a while to store (overlays are PNGs at the image's size)."""
    folder.mkdir()
    ramp = np.linspace(0, 255, side * side, dtype=np.float32).reshape(side, side)
    paths = []
    for index in range(count):
        path = folder / f"g{index:02d}.png"
        Image.fromarray(np.roll(ramp, 37 * index, axis=1).astype(np.uint8)).convert(
            "RGB").save(path, compress_level=1)
        paths.append(path)
    return paths


def timed_out(records: list[dict]) -> list[int]:
    """Indices of the records the time limit ended."""
    return [r["index"] for r in records if r["status"] == "error"
            and r["error"]["code"] == "time_limit"]


def stored_whole(store: Store, record: dict) -> bool:
    return all(store.exists(store.owns(uri)) for uri in record["files"].values())


def test_soft_limit_stops_between_batches(cnn_bundle: Path, tmp_path: Path) -> None:
    # Enough batches to outlast the limit on a fast machine (6 of them once took under
    # a second here); on a slow one the limit still falls after the first batch.
    images = gradients(tmp_path / "images", 12 * BATCH, 700)
    soft = 0.5
    env = service_env(redis_url(2), tmp_path / "store", images[0].parent,
                      soft_time_limit=str(soft), time_limit="60")
    settings, store = settings_for(env), Store(str(tmp_path / "store"))
    worker = start_worker("soft", env, tmp_path)
    try:
        worker.wait_ready()
        job = submit(cnn_bundle, images, chunk_size=len(images), settings=settings)
        wait_for(lambda: job.status() != "pending", 30, "the job to start", interval=0.02)
        began = time.monotonic()
        wait_for(lambda: job.status() == "failed", 60, "the job to fail", interval=0.02)
        overrun = time.monotonic() - began - soft
        records = job.wait(timeout=5)
        error = json.loads(store.get(f"jobs/{job.ids[0]}/error.json"))
        assert error["code"] == "time_limit" and "SOFT_TIME_LIMIT" in error["message"]
        done = [r for r in records if r["status"] == "ok"]
        # Whole batches, in order, each image stored whole; the rest end with the code.
        assert 0 < len(done) < len(images) and len(done) % BATCH == 0, len(done)
        assert [r["index"] for r in done] == list(range(len(done)))
        assert all(stored_whole(store, r) for r in done)
        assert timed_out(records) == list(range(len(done), len(images)))
        per_batch = max(r["timings"]["explain_ms"] + r["timings"]["decode_ms"]
                        for r in done) / 1000
        print(f"soft limit {soft} s: stopped {overrun:.2f} s past it, after "
              f"{len(done)}/{len(images)} images ({per_batch:.2f} s per batch)")
        quick = submit(cnn_bundle, images[:1], settings=settings).wait(timeout=30)
        assert quick[0]["status"] == "ok"  # the same worker serves on
    finally:
        worker.stop()


def pool_process(worker: Any) -> int:
    """The pid of the worker's one pool process (a child of its main process)."""
    pid = worker.process.pid
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


@pytest.mark.parametrize("asked", [None, 3600], ids=["plain", "message-asks-an-hour"])
def test_hard_kill_leaves_time_limit(cnn_bundle: Path, tmp_path: Path, asked: int | None) -> None:
    """The pool process hangs (SIGSTOP, as a stuck read or a native call would) once
    its first records are stored, so the soft limit cannot be checked; Celery kills it
    at the hard limit. A message asking Celery for an hour (its timelimit header) is
    held to the worker's limits all the same."""
    images = gradients(tmp_path / "images", 10 * BATCH, 64)
    env = service_env(redis_url(3), tmp_path / "store", tmp_path,
                      soft_time_limit="2", time_limit="3")
    settings, store = settings_for(env), Store(str(tmp_path / "store"))
    worker = start_worker("hard", env, tmp_path)
    try:
        worker.wait_ready()
        spec = JobSpec("job-hard-kill", store.put_bundle(cnn_bundle.read_bytes()),
                       [ImageRef(p.name, path=str(p)) for p in images])
        write_request(store, spec.job_id, spec.request_record())
        _app(settings).send_task("onnxcam.explain", args=[spec.to_message()],
                                 task_id=spec.job_id, time_limit=asked, soft_time_limit=asked)
        wait_for(lambda: store.exists(f"jobs/{spec.job_id}/00000.json"), 30,
                 "the first record", interval=0.005)
        os.kill(pool_process(worker), signal.SIGSTOP)
        wait_for(lambda: job_status(spec.job_id, settings) == "failed", 30, "the kill")
        # Celery's FAILURE state can land before error.json, which gives the images
        # the kill ended their time_limit records: read the records once it is there.
        wait_for(lambda: store.exists(f"jobs/{spec.job_id}/error.json"), 30, "error.json")
        records = job_records(spec.job_id, store)
        error = json.loads(store.get(f"jobs/{spec.job_id}/error.json"))
        assert error["code"] == "time_limit" and "ONNXCAM_TIME_LIMIT" in error["message"]
        assert "Hard time limit (3.0s) exceeded" in worker.text()
        done = [r for r in records if r["status"] == "ok"]
        assert 0 < len(done) < len(images)
        assert all(stored_whole(store, r) for r in done)  # what was stored stands
        assert sorted([r["index"] for r in done] + timed_out(records)) == list(
            range(len(images)))
        print(f"hard kill: {len(done)}/{len(images)} records kept, the rest time_limit")
        quick = submit(cnn_bundle, images[:1], settings=settings).wait(timeout=30)
        assert quick[0]["status"] == "ok"  # a fresh pool process serves on
    finally:
        worker.stop()

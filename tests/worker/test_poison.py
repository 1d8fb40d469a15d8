"""Poison messages: queue items that no onnxcam job can be made of, pushed raw onto a
real Redis, must be acknowledged, dropped and logged, and one worker of concurrency 1
must serve the good job sent next within seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from poison import POISON, QUEUE, envelope
from service import redis_url, service_env, settings_for, start_worker, wait_for

from onnxcam.worker.client import celery_status, submit
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("poison")
    root = folder / "images"
    root.mkdir()
    image = root / "good.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (24, 20, 3), dtype=np.uint8)
                    ).save(image)
    env = service_env(redis_url(1), folder / "store", root)
    return {"folder": folder, "image": image, "env": env, "settings": settings_for(env)}


def _redis(settings):  # noqa: ANN202 - redis.Redis
    import redis

    return redis.Redis.from_url(settings.broker_url)


def test_poison_never_stalls_a_worker(deployment: dict, cnn_bundle: Path) -> None:
    settings, image = deployment["settings"], deployment["image"]
    worker = start_worker("poisoned", deployment["env"], deployment["folder"], concurrency=1)
    try:
        worker.wait_ready()
        warm = submit(cnn_bundle, [image], settings=settings).wait(timeout=60)
        assert warm[0]["status"] == "ok"
        client = _redis(settings)
        for build in POISON.values():
            client.lpush(QUEUE, build({"v": 1}))  # a job message; the envelope is what breaks
        started = time.monotonic()
        records = submit(cnn_bundle, [image], settings=settings).wait(timeout=30)
        served_after = time.monotonic() - started
        assert records[0]["status"] == "ok"
        assert client.llen(QUEUE) == 0
        wait_for(lambda: client.hlen("unacked") == 0, 10, "unacked to empty")
        assert worker.process.poll() is None
    finally:
        worker.stop()
    log = worker.text()
    assert "Traceback" not in log
    dropped = log.count("dropped a broker message")
    print(f"{len(POISON)} poison items; good job served {served_after:.1f} s after; "
          f"{dropped} 'dropped' lines")
    # Each item logged once, as a drop or as a job that failed with a code.
    assert dropped + log.count("failed: malformed_job") == len(POISON), log[-3000:]


def test_task_message_of_the_wrong_shape_fails_with_a_code(deployment: dict,
                                                           cnn_bundle: Path) -> None:
    """A well-formed envelope for onnxcam.explain whose arguments are no job: the job
    fails with malformed_job and error.json, and the worker serves on."""
    settings = deployment["settings"]
    client, store = _redis(settings), Store(settings.store_url)
    cases = {"wrong-arity": [[], {}, {}], "extra-kwargs": [[{}], {"evil": 1}, {}],
             "kwargs-only": [[], {"message": {"v": 1}}, {}]}
    from poison import b64json

    for job_id, body in cases.items():
        client.lpush(QUEUE, json.dumps(envelope({}, job_id, body=b64json(body))))
    worker = start_worker("shapes", deployment["env"], deployment["folder"], concurrency=1)
    try:
        worker.wait_ready()
        for job_id in cases:
            wait_for(lambda job_id=job_id: celery_status(job_id, settings) == "failed", 30,
                     f"{job_id} to fail")
            error = json.loads(store.get(f"jobs/{job_id}/error.json"))
            assert error["code"] == "malformed_job", error
        records = submit(cnn_bundle, [deployment["image"]], settings=settings).wait(30)
        assert records[0]["status"] == "ok"
        assert client.hlen("unacked") == 0
    finally:
        worker.stop()


def _peak_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_message_too_large_for_any_job_is_dropped_unparsed(deployment: dict,
                                                            cnn_bundle: Path) -> None:
    """Issue 11: a 300 MB field grew the worker to 4.1 GB (2.1 GB in its main process
    once inline data was capped per image). A queue item larger than any job can be
    (its inline pixels capped by ONNXCAM_MAX_INLINE_JOB_BYTES) is dropped before it is
    parsed: the main process grows by what reading it takes, no more."""
    from poison import b64json

    from onnxcam.worker.broker import max_message_bytes

    settings, image = deployment["settings"], deployment["image"]
    env = {**deployment["env"], "ONNXCAM_MAX_INLINE_JOB_BYTES": str(2**20)}
    limit = max_message_bytes(2**20)
    worker = start_worker("swollen", env, deployment["folder"], concurrency=1)
    try:
        worker.wait_ready()
        assert submit(cnn_bundle, [image], settings=settings).wait(timeout=60)[0]["status"] \
            == "ok"
        before = _peak_mb(worker.process.pid)
        job = {"v": 1, "bundle": "ab" * 32, "images": [{"name": "x", "data": "A" * 80 * 2**20}]}
        item = json.dumps(envelope({}, "job-too-large", body=b64json([[job], {}, {}])))
        assert len(item) > 3 * limit
        client = _redis(settings)
        client.lpush(QUEUE, item)
        del item, job
        records = submit(cnn_bundle, [image], settings=settings).wait(timeout=60)
        assert records[0]["status"] == "ok"
        wait_for(lambda: client.hlen("unacked") == 0 and client.llen(QUEUE) == 0, 10,
                 "the queue to empty")
        grown = _peak_mb(worker.process.pid) - before
    finally:
        worker.stop()
    log = worker.text()
    assert "a queue item of" in log and "ONNXCAM_MAX_INLINE_JOB_BYTES" in log
    # ~143 MB as bytes and again as text while it is read; parsed and passed on, many times
    assert grown < 400, f"the worker's main process grew by {grown:.0f} MB"

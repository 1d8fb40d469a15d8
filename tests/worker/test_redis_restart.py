"""A Redis without persistence restarting under a real worker: the store, not Redis,
keeps what a job did, and a client learns of jobs the restart lost.

Each test runs its own redis-server with neither AOF nor snapshots, kills it with
SIGKILL and starts it again empty, as a crashed or redeployed Redis would come back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from service import (
    console,
    free_port,
    service_env,
    settings_for,
    start_redis,
    start_worker,
    wait_for,
    write_big_images,
)

from onnxcam.worker.client import submit
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_big_images(tmp_path_factory.mktemp("big"), 16)


def onnxcam(env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*console(), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)


def restart(server, folder: Path):  # noqa: ANN001, ANN201 - ServerProcess
    """SIGKILL the Redis and start it again on its port: empty, having no AOF."""
    server.stop(signal.SIGKILL)
    return start_redis(folder, server.port, aof=False)


def test_a_running_job_outlives_a_redis_restart(cnn_bundle: Path, big_images: list[Path],
                                                tmp_path: Path) -> None:
    server = start_redis(tmp_path, free_port(), aof=False)
    env = service_env(f"redis://127.0.0.1:{server.port}/0", tmp_path / "store",
                      big_images[0].parent, max_stored_side="1500")
    settings = settings_for(env)
    worker = start_worker("restart", env, tmp_path)
    try:
        worker.wait_ready()
        job = submit(cnn_bundle, big_images, chunk_size=len(big_images), settings=settings)
        (job_id,) = job.ids
        store = Store(settings.store_url)
        wait_for(lambda: store.exists(f"jobs/{job_id}/00001.json"), 60, "the job to start")
        server = restart(server, tmp_path)
        wait_for(lambda: store.exists(f"jobs/{job_id}/summary.json")
                 or store.exists(f"jobs/{job_id}/error.json"), 120, "the job to end")
        assert not store.exists(f"jobs/{job_id}/error.json"), worker.text()
        shown = onnxcam(env, "status", job_id)
        assert shown.stdout == "done\n", shown
        fetched = onnxcam(env, "result", job_id, "--json")
        assert fetched.returncode == 0, fetched.stderr
        records = [json.loads(line) for line in fetched.stdout.splitlines()]
        assert [r["status"] for r in records] == ["ok"] * len(big_images)
        # Celery's own result, written to the Redis that came back
        wait_for(lambda: redis.Redis(port=server.port).exists(f"celery-task-meta-{job_id}"),
                 10, "Celery's result")
        meta = json.loads(redis.Redis(port=server.port).get(f"celery-task-meta-{job_id}"))
        assert meta["status"] == "SUCCESS" and meta["result"]["ok"] == len(big_images)
        assert worker.process.poll() is None
        after = submit(cnn_bundle, big_images[:1], settings=settings).wait(timeout=60)
        assert after[0]["status"] == "ok"  # the worker serves on
    finally:
        worker.stop()
        server.stop()


def test_jobs_queued_in_a_redis_that_restarts_empty_are_reported_lost(
        cnn_bundle: Path, big_images: list[Path], tmp_path: Path) -> None:
    server = start_redis(tmp_path, free_port(), aof=False)
    env = service_env(f"redis://127.0.0.1:{server.port}/0", tmp_path / "store",
                      big_images[0].parent)
    settings = settings_for(env)
    worker = None
    try:
        job = submit(cnn_bundle, big_images[:3], chunk_size=1, settings=settings)
        # Still queued, in a Redis only seconds old: the queue is read, and holds them.
        assert [onnxcam(env, "status", j).stdout for j in job.ids] == ["pending\n"] * 3
        server = restart(server, tmp_path)
        shown = onnxcam(env, "status", job.ids[0])
        assert (shown.returncode, shown.stdout) == (0, "failed\n"), shown
        fetched = onnxcam(env, "result", job.ids[1], "--json")
        assert fetched.returncode == 2
        assert f"job {job.ids[1]} failed: job_lost: the broker no longer holds" \
            in fetched.stderr
        assert "appendonly" in fetched.stderr
        records = job.wait(timeout=30)  # ends, rather than waiting forever
        assert [r["error"]["code"] for r in records] == ["job_lost"] * 3
        assert job.status() == "failed"

        # Jobs queued after the restart are not lost, and run once a worker is up.
        again = submit(cnn_bundle, big_images[:2], chunk_size=1, settings=settings)
        assert again.status() == "pending"
        worker = start_worker("after-empty-restart", env, tmp_path)
        worker.wait_ready()
        assert [r["status"] for r in again.wait(timeout=60)] == ["ok", "ok"]
        assert all(j not in worker.text() for j in job.ids)  # the lost ones never ran
    finally:
        if worker is not None:
            worker.stop()
        server.stop()

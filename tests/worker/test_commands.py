"""``onnxcam submit``, ``status`` and ``result`` as a user meets them: where jobs went,
how far a job has got, records without files. Real Redis (a private, password
protected redis-server where the password matters), a real store, and for the last
test a real ``onnxcam worker``."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from service import (
    REDIS_HOST,
    ServerProcess,
    free_port,
    redis_url,
    service_env,
    start_worker,
    wait_for,
)

from onnxcam.cli import main
from onnxcam.worker.client import masked
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.records import write_record, write_request, write_summary
from onnxcam.worker.store import Store

PASSWORD = "s3cret-pw"


def onnxcam(env: dict[str, str], *args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("commands_images")
    rng = np.random.default_rng(11)
    paths = []
    for index in range(3):
        path = root / f"pic{index}.png"
        Image.fromarray(rng.integers(0, 255, (18 + index, 22, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server that wants a password; no worker listens to it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("locked_redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", REDIS_HOST, "--dir", str(folder),
         "--save", "", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerProcess(process, port)
    import redis

    client = redis.Redis(host=REDIS_HOST, port=port, password=PASSWORD)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_for(answers, 10, f"redis-server on port {port}")
    yield f"redis://:{PASSWORD}@{REDIS_HOST}:{port}/0"
    server.stop()


def test_masked_hides_only_the_password() -> None:
    assert masked("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert masked("rediss://user:p%40ss@h:6380/2?ssl_cert_reqs=required") == \
        "rediss://user:***@h:6380/2?ssl_cert_reqs=required"
    assert masked("redis://h:6379/0") == "redis://h:6379/0"
    assert masked("/home/u/.local/share/onnxcam/store") == "/home/u/.local/share/onnxcam/store"


def test_submit_says_where_on_stderr_and_status_counts_images(
        locked_redis: str, cnn_bundle: Path, images: list[Path], tmp_path: Path) -> None:
    port = locked_redis.rsplit(":", 1)[1].split("/")[0]
    env = service_env(locked_redis, tmp_path / "store", images[0].parent)
    queued = onnxcam(env, "submit", cnn_bundle, *images, "--chunk-size", "2")
    assert queued.exit_code == 0, queued.output
    ids = queued.stdout.splitlines()
    assert len(ids) == 2 and queued.stdout == "".join(f"{i}\n" for i in ids)
    assert queued.stderr == (f"onnxcam: queued 2 jobs of 3 images: broker "
                             f"redis://:***@{REDIS_HOST}:{port}/0, store {tmp_path / 'store'}\n")
    assert PASSWORD not in queued.output
    single = onnxcam(env, "submit", cnn_bundle, images[0])
    assert single.stderr.startswith("onnxcam: queued 1 job of 1 image: broker")
    # No worker serves this Redis: queued, nothing done.
    shown = onnxcam(env, "status", ids[0])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == "pending\n"  # the status word alone, as before
    assert shown.stderr == f"onnxcam: job {ids[0]}: 0 of 2 images done (Celery state PENDING)\n"
    last = onnxcam(env, "status", ids[1])
    assert last.stderr == f"onnxcam: job {ids[1]}: 0 of 1 image done (Celery state PENDING)\n"


def store_only_job(store: Store, names: list[str], done: int, finished: bool) -> str:
    """A job as the store holds it once Celery has forgotten it: its request, the
    records of its first ``done`` images, and its summary when ``finished``."""
    job_id = str(uuid.uuid4())
    spec = JobSpec(job_id, "0" * 64, [ImageRef(name, path=f"/data/{name}") for name in names],
                   targets=[None] * len(names))
    write_request(store, job_id, spec.request_record())
    for index in range(done):
        write_record(store, job_id, index, {"job": job_id, "index": index,
                                            "image": names[index], "status": "ok"})
    if finished:
        write_summary(store, job_id, {"job": job_id, "images": len(names)})
    return job_id


def test_status_and_result_from_the_store_alone(tmp_path: Path) -> None:
    env = service_env(redis_url(7), tmp_path / "store", tmp_path)
    store = Store(str(tmp_path / "store"))
    running = store_only_job(store, ["a.png", "b.png", "c.png"], done=1, finished=False)
    shown = onnxcam(env, "status", running)
    assert (shown.exit_code, shown.stdout) == (0, "pending\n")
    assert shown.stderr == f"onnxcam: job {running}: 1 of 3 images done (Celery state PENDING)\n"
    finished = store_only_job(store, ["a.png", "b.png"], done=2, finished=True)
    shown = onnxcam(env, "status", finished)
    assert (shown.exit_code, shown.stdout) == (0, "done\n")
    assert shown.stderr == f"onnxcam: job {finished}: 2 of 2 images done (Celery state PENDING)\n"

    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as here:
        printed = runner.invoke(main, ["result", finished, "--json"], env=env)
        assert printed.exit_code == 0, printed.output
        assert [json.loads(line) for line in printed.stdout.splitlines()] == [
            {"job": finished, "index": i, "image": name, "status": "ok"}
            for i, name in enumerate(["a.png", "b.png"])]
        assert list(Path(here).iterdir()) == []  # no files written anywhere here
        neither = runner.invoke(main, ["result", finished], env=env)
        assert neither.exit_code == 2 and neither.stdout == ""
        assert "give --out DIR for the files, --json for the records on stdout, or both" \
            in neither.stderr


@pytest.mark.slow
def test_a_real_worker_run_counts_every_image(cnn_bundle: Path, images: list[Path],
                                              tmp_path: Path) -> None:
    env = service_env(redis_url(7), tmp_path / "store", images[0].parent)
    worker = start_worker("counted", env, tmp_path)
    try:
        worker.wait_ready()
        queued = onnxcam(env, "submit", cnn_bundle, *images)
        assert queued.exit_code == 0, queued.output
        (job_id,) = queued.stdout.splitlines()

        def done() -> bool:
            return onnxcam(env, "status", job_id).stdout == "done\n"

        wait_for(done, 60, "the job to finish", interval=0.3)
        shown = onnxcam(env, "status", job_id)
        assert shown.stderr == \
            f"onnxcam: job {job_id}: 3 of 3 images done (Celery state SUCCESS)\n"
        printed = onnxcam(env, "result", job_id, "--json")
        assert printed.exit_code == 0, printed.output
        records = [json.loads(line) for line in printed.stdout.splitlines()]
        assert [(r["image"], r["status"]) for r in records] == [
            (path.name, "ok") for path in images]
    finally:
        worker.stop()

"""The worker service end to end: a real Redis, real ``onnxcam worker`` processes.

No eager mode: jobs cross the broker as JSON and run in separate processes, and
the tests read what the workers stored.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
from pathlib import Path

import models
import numpy as np
import pytest
from checks import assert_close
from PIL import Image
from service import (
    console,
    redis_url,
    service_env,
    settings_for,
    start_worker,
    wait_for,
    write_big_images,
)

from onnxcam.engine import Explainer
from onnxcam.engine.maps import heatmaps
from onnxcam.worker.client import Job, job_status, send, submit
from onnxcam.worker.message import ImageRef, JobSpec
from onnxcam.worker.settings import load_settings
from onnxcam.worker.store import Store

pytestmark = pytest.mark.slow
LABELS = models.CNN_LABELS


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def bundle(cnn_bundle: Path) -> Path:
    return cnn_bundle


@pytest.fixture(scope="module")
def images(folder: Path) -> dict[str, Path]:
    root = folder / "images"
    root.mkdir()
    rng = np.random.default_rng(3)
    paths = {}
    for index in range(6):
        path = root / f"img{index}.png"
        size = (20 + 7 * index, 30 - 2 * index)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths[path.name] = path
    for name, data in (("notes.txt", b"plain text\n"), ("empty.jpg", b""),
                       ("truncated.png", paths["img0.png"].read_bytes()[:70])):
        (root / name).write_bytes(data)
        paths[name] = root / name
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")
    paths["bomb.png"] = root / "bomb.png"
    paths["bomb.png"].write_bytes(bomb.getvalue())
    return paths


@pytest.fixture(scope="module")
def env(folder: Path, images: dict[str, Path]) -> dict[str, str]:
    return service_env(redis_url(9), folder / "store", images["img0.png"].parent)


@pytest.fixture(scope="module")
def settings(env: dict[str, str]):  # noqa: ANN201 - Settings
    return settings_for(env)


@pytest.fixture(scope="module")
def worker(env: dict[str, str], folder: Path):  # noqa: ANN201 - WorkerProcess
    process = start_worker("w1", env, folder, concurrency=2)
    process.wait_ready()
    yield process
    process.stop()


def check_against_engine(record: dict, path: Path, explainer: Explainer, store: Store) -> None:
    expected = explainer.explain(str(path))
    assert record["status"] == "ok", record
    assert record["target"] == int(expected.targets[0])
    assert_close(record["logits"], expected.logits[0], 1e-5, "logits")
    heatmap = np.load(io.BytesIO(store.get(store.owns(record["files"]["heatmap"]))))
    height, width = record["image_size"]
    assert_close(heatmap, heatmaps(expected.raw, height, width)[0], 1e-3, "heatmap")


def test_submit_and_wait(worker, bundle: Path, images: dict[str, Path], settings) -> None:
    names = [f"img{i}.png" for i in range(6)]
    job = submit(bundle, [images[n] for n in names], chunk_size=4, settings=settings)
    assert len(job.ids) == 2
    records = job.wait(timeout=60)
    assert job.status() == "done" and job.statuses() == ["done", "done"]
    assert [r["image"] for r in records] == names
    store, explainer = Store(settings.store_url), Explainer(bundle, device="cpu")
    for name, record in zip(names, records):
        check_against_engine(record, images[name], explainer, store)
    assert {r["bundle"] for r in records} == {job_sha(store)}


def job_sha(store: Store) -> str:
    (path,) = (Path(store.root) / "bundles").iterdir()
    return path.stem


def test_command_line(worker, bundle: Path, images: dict[str, Path], env: dict[str, str],
                      tmp_path: Path) -> None:
    def onnxcam(*args: object) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([*console(), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120, check=False)

    queued = onnxcam("submit", bundle, images["img1.png"], images["img2.png"],
                     "--method", "layercam", "--chunk-size", "1")
    assert queued.returncode == 0, queued.stderr
    ids = queued.stdout.splitlines()
    assert len(ids) == 2 and all(len(i) == 36 for i in ids), queued.stdout
    assert queued.stdout == "".join(f"{i}\n" for i in ids)  # ids, one per line, nothing else

    def done(job_id: str) -> bool:
        shown = onnxcam("status", job_id)
        assert shown.returncode == 0 and shown.stdout.strip() in ("pending", "started", "done")
        return shown.stdout == "done\n"

    wait_for(lambda: all(done(i) for i in ids), 60, "the jobs to finish", interval=0.5)
    fetched = onnxcam("result", ids[0], "--out", tmp_path, "--json")
    assert fetched.returncode == 0, fetched.stderr
    record = json.loads(fetched.stdout)
    assert record["method"] == "layercam" and record["image"] == "img1.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "img1.json", "img1.npy", "img1.png", "img1.raw.npy"]
    heatmap = np.load(tmp_path / "img1.npy")
    assert heatmap.dtype == np.float32 and heatmap.shape == tuple(record["image_size"])
    unknown = onnxcam("status", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 2 and unknown.stderr.startswith("onnxcam: error: no job")


def test_bad_input_never_stops_the_worker(worker, bundle: Path, images: dict[str, Path],
                                          settings, tmp_path: Path) -> None:
    from onnxcam.worker.client import _app

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    bad = ["notes.txt", "empty.jpg", "truncated.png", "bomb.png"]
    refs = [str(images[n]) for n in bad] + [str(images["img0.png"].parent / "missing.png"),
                                          str(outside), str(images["img3.png"])]
    job = submit(bundle, refs, settings=settings)
    records = job.wait(timeout=60)
    assert [(r.get("error") or {}).get("code", "ok") for r in records] == [
        "bad_image", "bad_image", "bad_image", "bad_image", "missing_image",
        "forbidden_path", "ok"]

    store, app = Store(settings.store_url), _app(settings)
    sha = job_sha(store)
    cases = {
        "unknown_bundle": JobSpec("job-unknown-bundle", "ab" * 32,
                                  [ImageRef("a", path=str(images["img0.png"]))]),
        "bad_method": JobSpec("job-bad-method", sha,
                              [ImageRef("a", path=str(images["img0.png"]))], "nonsense"),
        "bad_target": JobSpec("job-bad-target", sha,
                              [ImageRef("a", path=str(images["img0.png"]))], "gradcam", [17]),
    }
    for spec in cases.values():
        send(app, spec, store)
    # A malformed message: the right task, a body that is no onnxcam job.
    store.put("jobs/job-malformed/request.json", b'{"images": []}')
    app.send_task("onnxcam.explain", args=[{"v": 1, "bundle": sha, "method": "gradcam",
                                                  "images": "everything"}],
                  task_id="job-malformed")
    # Not even Celery's envelope: raw bytes pushed onto the queue.
    import redis

    for junk in (b"\x00 not json at all", b"[1, 2]", b"{}", b'{"body": 5, "headers": 1}'):
        redis.Redis.from_url(settings.broker_url).lpush("onnxcam", junk)

    def ended(job_id: str) -> bool:
        return job_status(job_id, settings) in ("done", "failed")

    for job_id in [*(s.job_id for s in cases.values()), "job-malformed"]:
        wait_for(lambda job_id=job_id: ended(job_id), 60, f"{job_id} to end")
    for code, spec in cases.items():
        (record,) = Job([spec.job_id], settings).wait(timeout=5)
        if code == "bad_target":
            assert job_status(spec.job_id, settings) == "done"
        else:
            assert job_status(spec.job_id, settings) == "failed"
        assert record["status"] == "error" and record["error"]["code"] == code, record
    assert job_status("job-malformed", settings) == "failed"
    error = json.loads(store.get("jobs/job-malformed/error.json"))
    assert error["code"] == "malformed_job" and "list of images" in error["message"]

    # The same worker process serves on, and nothing else was lost.
    assert worker.process.poll() is None
    after = submit(bundle, [images["img4.png"]], settings=settings).wait(timeout=60)
    assert after[0]["status"] == "ok"
    assert "Traceback" not in worker.text()  # bad input is expected, not a crash
    assert worker.text().count("dropped a broker message") == 4


def test_a_job_whose_process_keeps_dying_ends_with_worker_lost(
        worker, bundle: Path, images: dict[str, Path], settings) -> None:
    """A job whose worker process dies (out of memory, say) is handed out again; after
    MAX_STARTS it fails with worker_lost instead of going round forever. Its earlier
    starts are written as the store would hold them after that many deaths."""
    from onnxcam.worker.client import _app, publish
    from onnxcam.worker.tasks import MAX_STARTS

    store = Store(settings.store_url)
    sha = publish(bundle, store)
    spec = JobSpec("job-dies-each-time", sha, [ImageRef("a", path=str(images["img0.png"]))])
    store.put("jobs/job-dies-each-time/starts.json",
              json.dumps({"starts": MAX_STARTS}).encode())
    send(_app(settings), spec, store)
    wait_for(lambda: job_status(spec.job_id, settings) == "failed", 60, "the job to fail")
    error = json.loads(store.get("jobs/job-dies-each-time/error.json"))
    assert error["code"] == "worker_lost" and f"started {MAX_STARTS} times" in error["message"]
    assert not store.exists("jobs/job-dies-each-time/00000.json")  # it did not run again


def test_status_words(worker, bundle: Path, images: dict[str, Path], settings) -> None:
    job = submit(bundle, [images["img5.png"]], settings=settings)
    assert job.status() in ("pending", "started", "done")
    job.wait(timeout=60)
    assert job.status() == "done"
    import redis

    redis.Redis.from_url(settings.broker_url).delete(f"celery-task-meta-{job.ids[0]}")
    assert job.status() == "done"  # Celery's result expired: the store still knows
    with pytest.raises(Exception, match="no job"):
        job_status("not-a-job", settings)


@pytest.fixture(scope="module")
def big_images(folder: Path) -> list[Path]:
    return write_big_images(folder / "big", 24)


def test_redelivery_after_sigkill(bundle: Path, big_images: list[Path], tmp_path: Path) -> None:
    """kill -9 a worker's whole process group mid-job: the job finishes on another."""
    paths, root = big_images, big_images[0].parent
    # Maps stored at the images' full 1500 px: slow enough to catch the job mid-way.
    env = service_env(redis_url(10), tmp_path / "store", root, visibility_timeout="4",
                      max_stored_side="1500")
    settings = settings_for(env)
    doomed = start_worker("doomed", env, tmp_path)
    doomed.wait_ready()
    job = submit(bundle, paths, chunk_size=len(paths), settings=settings)
    (job_id,) = job.ids
    store = Store(settings.store_url)
    wait_for(lambda: store.exists(f"jobs/{job_id}/00002.json"), 60, "the job to be under way")
    doomed.kill_group()
    written_before = len(list((Path(store.root) / "jobs" / job_id).glob("*.json")))
    assert job_status(job_id, settings) == "started"
    assert written_before < len(paths) + 1, "the job finished before the kill; use more images"

    rescuer = start_worker("rescuer", env, tmp_path)
    try:
        rescuer.wait_ready()
        records = job.wait(timeout=120)
    finally:
        rescuer.stop()
    assert [r["status"] for r in records] == ["ok"] * len(paths)
    assert job_id in rescuer.text()
    meta = json.loads(__import__("redis").Redis.from_url(settings.broker_url).get(
        f"celery-task-meta-{job_id}"))
    assert meta["status"] == "SUCCESS" and meta["result"]["worker"].startswith("rescuer@")
    # the doomed worker's start and the rescuer's (and another when the 4 s visibility
    # timeout hands the job out again while the rescuer is still on it)
    assert json.loads(store.get(f"jobs/{job_id}/starts.json"))["starts"] >= 2
    explainer = Explainer(bundle, device="cpu")
    for index in (0, 5, len(paths) - 1):
        check_against_engine(records[index], paths[index], explainer, store)


def test_queued_jobs_survive_a_redis_restart(bundle: Path, images: dict[str, Path],
                                             tmp_path: Path) -> None:
    """Jobs queued with no worker up outlive a killed Redis, through its append-only file."""
    from service import free_port, start_redis

    port = free_port()
    server = start_redis(tmp_path, port)
    env = service_env(f"redis://127.0.0.1:{port}/0", tmp_path / "store",
                      images["img0.png"].parent)
    settings = settings_for(env)
    job = submit(bundle, [images[f"img{i}.png"] for i in range(3)], chunk_size=1,
                 settings=settings)
    server.stop(signal.SIGKILL)  # no clean shutdown: only the AOF keeps the queue
    server = start_redis(tmp_path, port)
    worker = start_worker("after-restart", env, tmp_path)
    try:
        worker.wait_ready()
        records = job.wait(timeout=60)
    finally:
        worker.stop()
        server.stop()
    assert [r["status"] for r in records] == ["ok"] * 3


def test_s3_store_through_moto(bundle: Path, images: dict[str, Path], tmp_path: Path) -> None:
    """Bundles, images and results on S3 (moto's standalone server on loopback)."""
    pytest.importorskip("s3fs")
    from service import free_port, start_moto

    port = free_port()
    moto = start_moto(port)
    env = {
        "ONNXCAM_BROKER_URL": redis_url(11),
        "ONNXCAM_STORE_URL": "s3://onnxcam-test/store",
        "ONNXCAM_DEVICE": "cpu",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    worker = None
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        import fsspec.config

        fsspec.config.set_conf_env(fsspec.config.conf)  # read FSSPEC_S3_* now
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir("onnxcam-test")
            settings = load_settings()
            store = Store(settings.store_url)
            uri = store.put("inputs/img1.png", images["img1.png"].read_bytes())
            assert uri == "s3://onnxcam-test/store/inputs/img1.png"
            worker = start_worker("s3", env, tmp_path)
            worker.wait_ready()
            job = submit(bundle, [uri, images["img2.png"]], settings=settings)
            records = job.wait(timeout=60)
            assert [r["status"] for r in records] == ["ok", "ok"], records
            assert records[0]["files"]["heatmap"].startswith("s3://onnxcam-test/store/jobs/")
            explainer = Explainer(bundle, device="cpu")
            check_against_engine(records[0], images["img1.png"], explainer, store)
            outside = submit(bundle, ["s3://other-bucket/x.png"], settings=settings).wait(60)
            assert outside[0]["error"]["code"] == "forbidden_path"
        finally:
            if worker is not None:
                worker.stop()
            moto.stop()
            fsspec.config.conf.pop("s3", None)


def test_soft_time_limit_fails_the_job(bundle: Path, big_images: list[Path],
                                       tmp_path: Path) -> None:
    env = service_env(redis_url(12), tmp_path / "store", big_images[0].parent,
                      soft_time_limit="0.5", time_limit="30")
    settings = settings_for(env)
    worker = start_worker("limited", env, tmp_path)
    try:
        worker.wait_ready()
        slow = submit(bundle, big_images, chunk_size=len(big_images), settings=settings)
        records = slow.wait(timeout=60)
        assert slow.status() == "failed"
        assert {r["error"]["code"] for r in records if r["status"] == "error"} == {"time_limit"}
        assert any(r["status"] == "error" for r in records)
        quick = submit(bundle, big_images[:1], settings=settings).wait(timeout=60)
        assert quick[0]["status"] == "ok"  # the same worker serves on
    finally:
        worker.stop()


def test_app_configuration_holds_the_guarantees() -> None:
    from onnxcam.worker.app import make_app

    settings = load_settings(visibility_timeout=77, max_memory_per_child=123456,
                             soft_time_limit=5, time_limit=9)
    conf = make_app(settings).conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 77
    assert conf.broker_transport_options["unacked_restore_interval"] == 77 / 4
    assert conf.worker_max_memory_per_child == 123456
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (None, 9)  # soft: per batch


def test_redis_with_tls_and_a_password(bundle: Path, images: dict[str, Path],
                                       tmp_path: Path) -> None:
    """rediss:// with a password and CA verification, all through the URL."""
    from click.testing import CliRunner
    from service import free_port, make_tls_certificates, start_tls_redis

    from onnxcam.cli import main

    certificates = make_tls_certificates(tmp_path)
    port = free_port()
    server = start_tls_redis(certificates, port, "s3cret")
    url = (f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={certificates['ca.crt']}")
    env = service_env(url, tmp_path / "store", images["img0.png"].parent)
    worker = start_worker("tls", env, tmp_path)
    try:
        worker.wait_ready()
        records = submit(bundle, [images["img1.png"]], settings=settings_for(env)).wait(60)
        assert records[0]["status"] == "ok"
        wrong = {**env, "ONNXCAM_BROKER_URL": url.replace("s3cret", "guess")}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in wrong.items():
                patch.setenv(name, value)
            result = CliRunner().invoke(main, ["submit", str(bundle), str(images["img1.png"])])
        assert result.exit_code == 2 and "cannot reach the broker" in result.stderr
        assert "guess" not in result.stderr
    finally:
        worker.stop()
        server.stop()


def test_a_client_and_a_worker_with_different_stores_are_told_so(
        bundle: Path, images: dict[str, Path], tmp_path: Path) -> None:
    """Issue 12: with the default, relative ONNXCAM_STORE_URL, a client and a worker in
    different folders use different stores. The worker's unknown_bundle reached the
    client as "job_error: job failed", and a done job's result as missing_result."""
    import os

    env = service_env(redis_url(12), Path("onnxcam-store"), images["img0.png"].parent)
    worker_side, client_side = tmp_path / "worker", tmp_path / "client"
    worker_side.mkdir()
    client_side.mkdir()
    worker = start_worker("elsewhere", env, worker_side)
    try:
        worker.wait_ready()
        assert f"store: {worker_side / 'onnxcam-store'}" in worker.text()

        def onnxcam(where: Path, *args: object) -> subprocess.CompletedProcess:
            return subprocess.run([*console(), *map(str, args)], capture_output=True,
                                  text=True, env={**os.environ, **env}, cwd=where, timeout=120)

        (job,) = onnxcam(client_side, "submit", bundle, images["img1.png"]).stdout.split()
        failed = onnxcam(client_side, "result", job, "--out", tmp_path / "a", "--wait", "60")
        assert failed.returncode == 2
        assert "unknown_bundle: no bundle" in failed.stderr
        assert f"this client published it to {client_side / 'onnxcam-store'}" in failed.stderr
        # the worker's store gets the bundle from a client in its own folder; then a job
        # from the other folder runs, and its results land where that client cannot see
        (first,) = onnxcam(worker_side, "submit", bundle, images["img1.png"]).stdout.split()
        assert onnxcam(worker_side, "result", first, "--out", tmp_path / "b",
                       "--wait", "60").returncode == 0
        (job,) = onnxcam(client_side, "submit", bundle, images["img2.png"]).stdout.split()
        missing = onnxcam(client_side, "result", job, "--out", tmp_path / "c", "--wait", "60")
        assert missing.returncode == 2
        assert f"no result stored in {client_side / 'onnxcam-store'}" in missing.stderr
        assert "same ONNXCAM_STORE_URL" in missing.stderr
    finally:
        worker.stop()


def test_the_default_store_is_one_per_user_whatever_the_folder(tmp_path: Path) -> None:
    """Issue 12: the default store was relative ("onnxcam-store"), so a client and a
    worker started in different folders used different stores."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONNXCAM_STORE_URL"}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    seen = set()
    for folder in (tmp_path / "a", tmp_path / "b" / "c"):
        folder.mkdir(parents=True)
        shown = subprocess.run(
            [sys.executable, "-c", "from onnxcam.worker.settings import load_settings;"
             " print(load_settings().store_url)"], cwd=folder, env=env, capture_output=True,
            text=True, check=True)
        seen.add(shown.stdout.strip())
    assert seen == {str(tmp_path / "data" / "onnxcam" / "store")}

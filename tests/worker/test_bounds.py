"""What one job may ask of a worker: inline caps, images and input bytes per job, the
stored heatmap's size; and what it leaves behind: Celery's result, file modes, a job
folder readable without request.json.

Parsing and ``run_job`` are tested as functions; the rest against a real Redis and a
real ``onnxcam worker`` process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from checks import assert_close
from PIL import Image
from service import console, redis_url, service_env, settings_for, start_worker, wait_for

from onnxcam.engine import Explainer
from onnxcam.engine.images import Limits, load_image, resize
from onnxcam.engine.outputs import stored_size
from onnxcam.errors import JobError, MalformedJobError
from onnxcam.worker.client import _app, job_records, job_status, submit
from onnxcam.worker.jobs import ModelCache, load, run_job
from onnxcam.worker.message import ImageRef, JobSpec, parse_job
from onnxcam.worker.settings import JobBounds, load_settings
from onnxcam.worker.store import Store


@pytest.fixture(scope="module", autouse=True)
def umask_022():  # noqa: ANN201
    """The usual umask, for this module's processes and the worker it starts: the files
    they write must come out 0644."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bounds")


@pytest.fixture(scope="module")
def images(folder: Path) -> dict[str, Path]:
    root = folder / "images"
    root.mkdir()
    rng = np.random.default_rng(5)
    paths = {}
    for index, size in enumerate(((20, 30), (33, 17), (25, 25))):
        paths[f"small{index}"] = root / f"small{index}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            paths[f"small{index}"])
    # A gradient, so that the stored picture's downscaling shows in the overlay.
    ramp = np.linspace(0, 255, 600, dtype=np.float32)[None, :, None] * np.ones((450, 1, 3))
    paths["wide"] = root / "wide.png"
    Image.fromarray(ramp.astype(np.uint8)).save(paths["wide"])
    # The attack, smaller: single-colour PNGs of 24 Mpx in a few tens of KB.
    for index in range(3):
        paths[f"flat{index}"] = root / f"flat{index}.png"
        Image.new("RGB", (6000, 4000), (30 + 60 * index, 90, 200)).save(paths[f"flat{index}"])
    return paths


def inline(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------- parsing


def message(images: list[dict]) -> dict:
    return {"v": 1, "bundle": "0" * 64, "method": "gradcam", "images": images}


def test_stored_size_bounds_the_long_side() -> None:
    # Hand-worked: 1024 / 8000 = 0.128; 7999 * 0.128 = 1023.87 -> 1024.
    assert stored_size(7999, 8000, 1024) == (1024, 1024)
    assert stored_size(3000, 1000, 1024) == (1024, 341)  # 1000 * 1024 / 3000 = 341.3
    assert stored_size(500, 400, 1024) == (500, 400)  # small images keep their size
    assert stored_size(1024, 10, 1024) == (1024, 10)
    assert stored_size(2, 5000, 1024) == (1, 1024)  # never below one pixel


def test_inline_caps_refuse_images_before_decoding() -> None:
    bounds = JobBounds(max_inline_image_bytes=100, max_inline_job_bytes=250)
    sizes = [99, 100, 101, 50, 2, 1]  # running total of the accepted: 99, 199, -, 249, -, 250
    refs = parse_job(message([{"name": f"i{n}", "data": inline(b"x" * n)} for n in sizes]),
                     "j", bounds).images
    assert [ref.refusal is None for ref in refs] == [True, True, False, True, False, True]
    assert [len(ref.data or b"") for ref in refs] == [99, 100, 0, 50, 0, 1]
    assert "101 bytes, over the 100 limit (ONNXCAM_MAX_INLINE_IMAGE_BYTES)" in str(
        refs[2].refusal)
    assert "ONNXCAM_MAX_INLINE_JOB_BYTES" in str(refs[4].refusal)
    # Over the cap, the text is never decoded: not even base64 is required of it.
    (refused,) = parse_job(message([{"name": "junk", "data": "!" * 1000}]), "j",
                           bounds).images
    assert refused.refusal is not None and refused.data is None
    with pytest.raises(MalformedJobError, match="not base64"):
        parse_job(message([{"name": "junk", "data": "!" * 100}]), "j", bounds)


def test_images_and_names_per_job_are_bounded() -> None:
    three = [{"path": f"/x/{i}.png"} for i in range(3)]
    assert len(parse_job(message(three), "j", JobBounds(max_images=3)).images) == 3
    with pytest.raises(MalformedJobError, match="at most 2 .ONNXCAM_MAX_JOB_IMAGES"):
        parse_job(message(three), "j", JobBounds(max_images=2))
    with pytest.raises(MalformedJobError, match="its name is over 4096 characters"):
        parse_job(message([{"name": "n" * 5000, "uri": "s3://b/k"}]), "j")
    # A path too long for any file system ends its own image as bad_path when it is
    # read (tests/worker/test_sources.py), under its number, not its text.
    (long,) = parse_job(message([{"path": "/" + "p" * 5000}]), "j").images
    assert long.name == "image-0" and long.refusal is None


# ---------------------------------------------------------------------------- run_job


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "1", "I;16"])
@pytest.mark.parametrize("channels", [3, 1])
def test_load_gives_what_the_engine_decodes(cnn_bundle: Path, mode: str, channels: int) -> None:
    """The job's images at the bundle's size and at the stored size are what the engine's
    own decoding (``load_image``, then ``resize``) gives, to the byte, in every mode."""
    info = dataclasses.replace(Explainer(cnn_bundle, device="cpu").info, channels=channels)
    rng = np.random.default_rng(len(mode))
    pixels = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode == "P":
        image = image.quantize(17)
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    loaded = load(buffer.getvalue(), "x.png", info, Limits(), max_side=50)
    full = load_image(buffer.getvalue(), channels)
    assert loaded.size == (90, 130)
    assert np.array_equal(loaded.model_input, resize(full, info.height, info.width, info.resize))
    assert np.array_equal(loaded.picture, resize(full, 35, 50))  # 90x130 -> 34.6x50


def test_input_bytes_per_job_refuse_what_is_over(cnn_bundle: Path, store: Store,
                                                 images: dict[str, Path]) -> None:
    names = ["small0", "small1", "small2", "small0"]
    sizes = [images[name].stat().st_size for name in names]
    # Room for the first two and the fourth (the third would go over), counted by hand.
    budget = sizes[0] + sizes[1] + sizes[3]
    assert sizes[0] + sizes[1] + sizes[2] > budget
    settings = load_settings(store_url=store.url, allowed_roots=str(images["small0"].parent),
                             max_job_bytes=budget)
    sha = store.put_bundle(cnn_bundle.read_bytes())
    refs = [ImageRef(name, path=str(images[name])) for name in names]
    summary = run_job(JobSpec("job-b", sha, refs, targets=[None] * 4), store,
                      ModelCache(store, 1, "cpu"), settings)
    assert [image["status"] for image in summary["images"]] == ["ok", "ok", "error", "ok"]
    error = summary["images"][2]["error"]
    assert error["code"] == "bad_image" and "ONNXCAM_MAX_JOB_BYTES" in error["message"]


def test_stored_heatmap_and_overlay_are_bounded(cnn_bundle: Path, store: Store,
                                                images: dict[str, Path]) -> None:
    settings = load_settings(store_url=store.url, allowed_roots=str(images["wide"].parent),
                             max_stored_side=100)
    sha = store.put_bundle(cnn_bundle.read_bytes())
    refs = [ImageRef("wide.png", path=str(images["wide"])),
            ImageRef("small0.png", path=str(images["small0"]))]
    run_job(JobSpec("job-s", sha, refs, targets=[None, None]), store,
            ModelCache(store, 1, "cpu"), settings)
    expected = Explainer(cnn_bundle, device="cpu").explain([str(images["wide"]),
                                                            str(images["small0"])])
    record = json.loads(store.get("jobs/job-s/00000.json"))
    # The engine's input is the full image's: the same logits as explaining the file.
    assert_close(record["logits"], expected.logits[0], 1e-5, "logits")
    assert record["image_size"] == [450, 600]  # the image's own size, as before
    raw = np.load(io.BytesIO(store.get("jobs/job-s/00000.raw.npy")))
    assert_close(raw, expected.raw[0], 1e-5, "raw map at layer resolution")
    heatmap = np.load(io.BytesIO(store.get("jobs/job-s/00000.npy")))
    assert heatmap.dtype == np.float16 and heatmap.shape == (75, 100)  # 450x600 -> 75x100
    assert_close(heatmap, reference_heatmap(expected.raw[0], 75, 100), 1e-3, "heatmap")
    overlay = Image.open(io.BytesIO(store.get("jobs/job-s/00000.png")))
    assert overlay.size == (100, 75)
    # A small image keeps its size.
    small = np.load(io.BytesIO(store.get("jobs/job-s/00001.npy")))
    assert small.shape == (20, 30)
    assert_close(small, reference_heatmap(expected.raw[1], 20, 30), 1e-3, "small heatmap")


def reference_heatmap(raw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Min-max scaling in float64, then Pillow's bilinear resize of a float image, which
    when enlarging is OpenCV's INTER_LINEAR (half-pixel centres, edges held)."""
    raw = raw.astype(np.float64)
    scaled = (raw - raw.min()) / (raw.max() - raw.min() + 1e-7)
    image = Image.fromarray(scaled.astype(np.float32), mode="F")
    return np.clip(np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)), 0, 1)


def test_records_are_found_without_request_json(cnn_bundle: Path, store: Store,
                                                images: dict[str, Path]) -> None:
    settings = load_settings(store_url=store.url, allowed_roots=str(images["small0"].parent))
    sha = store.put_bundle(cnn_bundle.read_bytes())
    refs = [ImageRef("a", path=str(images["small0"])), ImageRef("b", path="/nowhere/b.png")]
    run_job(JobSpec("job-r", sha, refs, targets=[None, None]), store,
            ModelCache(store, 1, "cpu"), settings)
    assert not store.exists("jobs/job-r/request.json")  # run_job never writes it
    records = job_records("job-r", store)
    assert records == [json.loads(store.get(f"jobs/job-r/{i:05d}.json")) for i in (0, 1)]
    assert [r["status"] for r in records] == ["ok", "error"]


# ---------------------------------------------------------------------------- real worker


@pytest.fixture(scope="module")
def env(images: dict[str, Path]):  # noqa: ANN201 - dict[str, str]
    # The store outside pytest's own folder (0700), so another user can reach it.
    store = Path(tempfile.mkdtemp(prefix="onnxcam-bounds-"))
    store.chmod(0o755)
    yield service_env(redis_url(5), store, images["small0"].parent, max_job_images="4")
    shutil.rmtree(store)


@pytest.fixture(scope="module")
def worker(env: dict[str, str], folder: Path):  # noqa: ANN201 - WorkerProcess
    process = start_worker("bounds", env, folder, concurrency=1)
    process.wait_ready()
    yield process
    process.stop()


def send_raw(env: dict[str, str], job_id: str, sha: str, images: list[dict]) -> None:
    """As a plain Celery client would: the message only, no request.json."""
    app = _app(settings_for(env))
    app.send_task("onnxcam.explain", args=[{**message(images), "bundle": sha}],
                  task_id=job_id)


def celery_meta(env: dict[str, str], job_id: str) -> tuple[dict, int]:
    import redis

    client = redis.Redis.from_url(env["ONNXCAM_BROKER_URL"])
    key = f"celery-task-meta-{job_id}"
    wait_for(lambda: client.exists(key) and json.loads(client.get(key))["status"] in (
        "SUCCESS", "FAILURE"), 60, f"job {job_id} to end")
    return json.loads(client.get(key)), int(client.memory_usage(key) or 0)


def test_nothing_heavy_in_redis(worker, cnn_bundle: Path, env: dict[str, str],
                                images: dict[str, Path]) -> None:
    store = Store(env["ONNXCAM_STORE_URL"])
    sha = store.put_bundle(cnn_bundle.read_bytes())
    junk = inline(os.urandom(3 * 2**20))  # over the 1 MiB default cap
    good = inline(images["small1"].read_bytes())
    send_raw(env, "inline-job", sha, [{"name": "junk", "data": junk},
                                      {"name": "good", "data": good}])
    meta, used = celery_meta(env, "inline-job")
    # Before: MEMORY USAGE was the size of the arguments (29 MB for a 20 MiB field).
    assert used < 4096, used
    text = json.dumps(meta)
    assert good[:64] not in text and junk[:64] not in text and "args" not in meta
    junk_record, good_record = meta["result"]["images"]
    assert junk_record["error"]["code"] == "bad_image"
    assert "ONNXCAM_MAX_INLINE_IMAGE_BYTES" in junk_record["error"]["message"]
    assert good_record["status"] == "ok"


def test_result_without_request_json(worker, cnn_bundle: Path, env: dict[str, str],
                                     images: dict[str, Path], tmp_path: Path) -> None:
    store = Store(env["ONNXCAM_STORE_URL"])
    sha = store.put_bundle(cnn_bundle.read_bytes())
    job_id = "00000000-0000-4000-8000-00000000b0b0"
    send_raw(env, job_id, sha, [{"path": str(images["small0"])},
                                {"path": str(images["small0"].parent / "absent.png")}])
    celery_meta(env, job_id)

    def onnxcam(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([*console(), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=60, check=False)

    assert onnxcam("status", job_id).stdout == "done\n"
    fetched = onnxcam("result", job_id, "--out", tmp_path, "--json")
    assert fetched.returncode == 2, fetched.stderr  # 2: one image was bad (before: no job)
    assert "missing_image" in fetched.stderr and "no job" not in fetched.stderr
    records = [json.loads(line) for line in fetched.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[0] == {**json.loads(store.get(f"jobs/{job_id}/00000.json")),
                          "files": records[0]["files"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "small0.json", "small0.npy", "small0.png", "small0.raw.npy"]
    # Once Celery's result has expired, the job folder alone still says done.
    import redis

    redis.Redis.from_url(env["ONNXCAM_BROKER_URL"]).delete(f"celery-task-meta-{job_id}")
    assert onnxcam("status", job_id).stdout == "done\n"


def child_peak_mib(worker) -> int:  # noqa: ANN001 - WorkerProcess
    """The largest VmHWM among the worker's pool processes, in MiB."""
    peaks = []
    for task in Path(f"/proc/{worker.process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            status = Path(f"/proc/{child}/status").read_text()
            peaks += [int(line.split()[1]) // 1024 for line in status.splitlines()
                      if line.startswith("VmHWM")]
    return max(peaks)


def test_big_flat_images_stay_small(worker, cnn_bundle: Path, env: dict[str, str],
                                    images: dict[str, Path]) -> None:
    settings = settings_for(env)
    flat = [images[f"flat{i}"] for i in range(3)]
    assert all(path.stat().st_size < 200_000 for path in flat)  # 24 Mpx each
    job = submit(cnn_bundle, flat, settings=settings, chunk_size=3)
    records = job.wait(timeout=120)
    assert [r["status"] for r in records] == ["ok"] * 3
    assert [r["image_size"] for r in records] == [[4000, 6000]] * 3
    # Before: each image kept at full size through the job, 1.5 GB at peak here.
    # Now: one image at a time at full size, while decoding only.
    assert child_peak_mib(worker) < 900
    folder = Path(settings.store_url) / "jobs" / job.ids[0]
    per_image = [sum(f.stat().st_size for f in folder.glob(f"{i:05d}.*")) for i in range(3)]
    # A (683, 1024) float16 heatmap is 1.4 MB; before, (4000, 6000) was 48 MB.
    assert max(per_image) < 2_000_000, per_image
    assert np.load(folder / "00000.npy").shape == (683, 1024)
    # Files respect the umask (022 for the worker and for submit): 0644, not 0600.
    written = [p for p in Path(settings.store_url).rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    assert {p.name for p in written} >= {"request.json", "00000.npy", "summary.json"}
    if os.geteuid() == 0:  # another user (as the container's) reads what submit wrote
        bundle = next((Path(settings.store_url) / "bundles").iterdir())
        read = subprocess.run(["head", "-c", "4", str(bundle)], user=65534, group=65534,
                              capture_output=True, check=False)
        assert read.returncode == 0, read.stderr


def test_images_per_job(worker, cnn_bundle: Path, env: dict[str, str],
                        images: dict[str, Path]) -> None:
    settings = settings_for(env)
    with pytest.raises(JobError, match="ONNXCAM_MAX_JOB_IMAGES"):
        submit(cnn_bundle, [images["small0"]] * 5, settings=settings, chunk_size=5)
    sha = Store(settings.store_url).put_bundle(cnn_bundle.read_bytes())
    send_raw(env, "too-many", sha, [{"path": str(images["small0"])}] * 5)
    meta, _ = celery_meta(env, "too-many")
    assert meta["status"] == "FAILURE"
    error = json.loads(Store(settings.store_url).get("jobs/too-many/error.json"))
    assert error["code"] == "malformed_job" and "at most 4" in error["message"]
    assert job_status("too-many", settings) == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["external-data", "huge-batch"])
def test_a_hostile_bundle_fails_its_job_alone(worker, cnn_bundle: Path, env: dict[str, str],
                                              images: dict[str, Path], folder: Path,
                                              attack: str) -> None:
    """A bundle whose weight is read from a file beside the worker (the issue's
    credentials leak), or whose metadata claims a batch of 1e8 (a 1.1 TiB repeat that
    killed worker after worker): the job fails as bad_bundle without running, and the
    next good job is served by the same worker."""
    from hostile_bundles import reading_outside, with_metadata

    settings = settings_for(env)
    store = Store(settings.store_url)
    if attack == "external-data":
        data, length = reading_outside(cnn_bundle, "credentials")
        (folder / "credentials").write_bytes(b"aws_secret_access_key=" + b"k" * length)
    else:
        data = with_metadata(cnn_bundle, batch_size="100000000")
    job_id = f"hostile-{attack}"
    send_raw(env, job_id, store.put_bundle(data), [{"path": str(images["small0"])}])
    meta, _ = celery_meta(env, job_id)
    assert meta["status"] == "FAILURE"
    error = json.loads(store.get(f"jobs/{job_id}/error.json"))
    assert error["code"] == "bad_bundle", error
    # Refused for what it is, before onnxruntime is asked (which, loading from bytes,
    # happens to fail on such a bundle today; from a path it reads the file).
    assert ("outside its file" if attack == "external-data" else "batch size") \
        in error["message"], error
    assert store.find(f"jobs/{job_id}/00000.json") is None  # nothing of it ran
    good = submit(cnn_bundle, [images["small1"]], settings=settings, chunk_size=1)
    (record,) = good.wait(timeout=60)
    assert record["status"] == "ok"
    assert worker.process.poll() is None and "MemoryError" not in worker.text()

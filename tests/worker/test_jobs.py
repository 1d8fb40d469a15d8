"""Job functions and the task body, without a broker: parsing, fetching, running, storing."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from checks import assert_close
from PIL import Image

from onnxcam.engine import Explainer
from onnxcam.engine.maps import heatmaps
from onnxcam.errors import (
    BadMethodError,
    BundleError,
    ForbiddenPathError,
    MalformedJobError,
    MissingImageError,
    SettingsError,
    StoreError,
    StoreUnavailableError,
    UnknownBundleError,
)
from onnxcam.exporter import export
from onnxcam.worker.jobs import ModelCache, fetch, run_job
from onnxcam.worker.keys import HEATMAP, OVERLAY, RAW, RECORD, bundle_key, image_key
from onnxcam.worker.message import ImageRef, JobSpec, parse_job
from onnxcam.worker.records import read_error, read_record
from onnxcam.worker.settings import load_settings
from onnxcam.worker.sources import AllowList, allowed_path
from onnxcam.worker.store import Store

LABELS = models.CNN_LABELS


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def bundle(cnn_bundle: Path) -> bytes:
    return cnn_bundle.read_bytes()


@pytest.fixture(scope="module")
def images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    paths = {}
    for name, size in (("a.png", (20, 30)), ("b.jpg", (16, 16)), ("c.png", (41, 17))):
        path = folder / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths[name] = path
    paths["text"] = folder / "images" / "notes.txt"
    paths["text"].write_text("not an image\n")
    paths["empty"] = folder / "images" / "empty.png"
    paths["empty"].write_bytes(b"")
    paths["truncated"] = folder / "images" / "truncated.png"
    paths["truncated"].write_bytes(paths["a.png"].read_bytes()[:60])
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpx, a few KB compressed
    paths["bomb"] = folder / "images" / "bomb.png"
    paths["bomb"].write_bytes(bomb.getvalue())
    return paths


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture()
def settings(folder: Path, store: Store):  # noqa: ANN201 - Settings
    return load_settings(store_url=store.url, allowed_roots=str(folder / "images"))


def spec_for(sha: str, refs: list[ImageRef], method: str = "gradcam",
             targets: list | None = None) -> JobSpec:
    return JobSpec("job-1", sha, refs, method, targets or [None] * len(refs))


# ---------------------------------------------------------------------------- messages


def test_message_round_trip(images: dict[str, Path]) -> None:
    refs = [ImageRef("a.png", path=str(images["a.png"])), ImageRef("u", uri="s3://b/k.png"),
            ImageRef("i", data=b"\x89PNG")]
    spec = JobSpec("id-7", "f" * 64, refs, "layercam", [None, 3, 0], 8,
                   {"samples": 4, "noise": 0.2, "steps": 16, "seed": 3, "eigen_smooth": True})
    message = json.loads(json.dumps(spec.to_message()))  # JSON only, as on the wire
    assert parse_job(message, "id-7") == spec
    assert "data" not in json.dumps(spec.request_record())


@pytest.mark.parametrize("message, match", [
    ("hello", "JSON object"),
    ([1, 2], "JSON object"),
    ({"v": 99, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}]}, "version"),
    ({"v": 1, "bundle": 5, "method": "gradcam", "images": [{"path": "a"}]}, "strings"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": []}, "non-empty"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": ["a.png"]}, "not an object"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a", "uri": "b"}]},
     "exactly one"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"data": "%%%"}]}, "base64"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "threshold": 1}, "threshold"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "threshold": True}, "threshold"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "targets": [1, 2]}, "targets"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "options": {"samples": 0}}, "samples must be an int in"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "options": {"noise": "loud"}}, "noise must be a number"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "options": {"threads": 64}}, "options may set only"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "options": {"eigen_smooth": 1}}, "eigen_smooth must be true or false"),
    ({"v": 1, "bundle": "x", "method": "gradcam", "images": [{"path": "a"}],
      "faithfulness_steps": -1}, "faithfulness_steps"),
])
def test_malformed_messages(message: object, match: str) -> None:
    with pytest.raises(MalformedJobError, match=match):
        parse_job(message, "id")


# ---------------------------------------------------------------------------- fetching


def test_allowed_roots_follow_links(tmp_path: Path, images: dict[str, Path]) -> None:
    root = images["a.png"].parent
    assert allowed_path(str(images["a.png"]), [str(root)]) == images["a.png"].resolve()
    link = root / "escape.png"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/hostname")
    with pytest.raises(ForbiddenPathError):
        allowed_path(str(link), [str(root)])
    with pytest.raises(ForbiddenPathError):
        allowed_path(f"{root}/../../etc/passwd", [str(root)])
    with pytest.raises(ForbiddenPathError):  # a sibling whose name merely starts the same
        allowed_path(str(root) + "-other/x.png", [str(root)])
    link.unlink()


def test_fetch_sources(store: Store, images: dict[str, Path]) -> None:
    roots = AllowList((str(images["a.png"].parent),))
    data = images["a.png"].read_bytes()
    limits = load_settings().limits
    assert fetch(ImageRef("a", path=str(images["a.png"])), store, roots, limits) == data
    assert fetch(ImageRef("a", data=data), store, roots, limits) == data
    uri = store.put("inputs/a.png", data)
    assert fetch(ImageRef("a", uri=uri), store, roots, limits) == data
    with pytest.raises(MissingImageError):
        fetch(ImageRef("a", uri=store.uri("inputs/nope.png")), store, roots, limits)
    with pytest.raises(ForbiddenPathError):
        fetch(ImageRef("a", uri="file:///etc/passwd"), store, roots, limits)
    with pytest.raises(ForbiddenPathError):
        fetch(ImageRef("a", uri="s3://elsewhere/x.png"), store, roots, limits)
    with pytest.raises(MissingImageError):
        fetch(ImageRef("a", path=roots.roots[0] + "/missing.png"), store, roots, limits)


def test_oversized_objects_are_refused_before_reading(store: Store,
                                                     images: dict[str, Path]) -> None:
    from onnxcam.engine.images import Limits
    from onnxcam.errors import BadImageError

    data = images["a.png"].read_bytes()
    uri = store.put("inputs/a.png", data)
    tight = Limits(max_bytes=len(data) - 1)
    with pytest.raises(BadImageError, match=f"{len(data)} bytes, over the {len(data) - 1}"):
        fetch(ImageRef("a", uri=uri), store, AllowList(()), tight)
    assert fetch(ImageRef("a", uri=uri), store, AllowList(()),
                 Limits(max_bytes=len(data))) == data
    # A local file too, by path or file:// URI, named as the job names it.
    roots = AllowList((str(images["a.png"].parent),))
    for ref, shown in ((ImageRef("a", path=str(images["a.png"])), str(images["a.png"])),
                       (ImageRef("a", uri=f"file://{images['a.png']}"),
                        f"file://{images['a.png']}")):
        with pytest.raises(BadImageError) as caught:
            fetch(ref, store, roots, tight)
        assert str(caught.value) == (f"{shown}: file is {len(data)} bytes, over the "
                                     f"{len(data) - 1} limit")
        assert fetch(ref, store, roots, Limits(max_bytes=len(data))) == data


# ---------------------------------------------------------------------------- running


def test_run_job_matches_the_engine(bundle: bytes, store: Store, settings,
                                    images: dict[str, Path]) -> None:
    sha = store.put_bundle(bundle)
    names = ["a.png", "b.jpg", "c.png"]
    refs = [ImageRef(n, path=str(images[n])) for n in names]
    # a target by label, as --target dog sends it: the worker looks it up
    summary = run_job(spec_for(sha, refs, targets=[None, LABELS[2], None]), store,
                      ModelCache(store, 2, "cpu"), settings)
    assert (summary["n"], summary["ok"], summary["errors"]) == (3, 3, 0)

    explainer = Explainer(bundle, device="cpu")
    for index, name in enumerate(names):
        record = json.loads(store.get(f"jobs/job-1/{index:05d}.json"))
        target = 2 if index == 1 else None
        expected = explainer.explain(str(images[name]), targets=target)
        assert record["target"] == int(expected.targets[0])
        assert record["label"] == LABELS[record["target"]]
        assert record["bundle"] == sha and record["method"] == "gradcam"
        assert_close(record["logits"], expected.logits[0], 1e-6, "logits")
        raw = np.load(io.BytesIO(store.get(f"jobs/job-1/{index:05d}.raw.npy")))
        assert_close(raw, expected.raw[0], 1e-6, "raw map")
        heatmap = np.load(io.BytesIO(store.get(f"jobs/job-1/{index:05d}.npy")))
        height, width = Image.open(images[name]).size[::-1]
        assert heatmap.dtype == np.float16 and heatmap.shape == (height, width)
        assert record["image_size"] == [height, width]
        assert_close(heatmap, heatmaps(expected.raw, height, width)[0], 1e-3, "heatmap")
        overlay = Image.open(io.BytesIO(store.get(f"jobs/job-1/{index:05d}.png")))
        assert overlay.size == (width, height)
        assert set(record["timings"]) == {"decode_ms", "explain_ms"}


def test_bad_images_and_targets_end_only_their_image(bundle: bytes, store: Store, settings,
                                                      images: dict[str, Path],
                                                      tmp_path: Path) -> None:
    sha = store.put_bundle(bundle)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    cases = {
        "text": ImageRef("notes.txt", path=str(images["text"])),
        "empty": ImageRef("empty.png", path=str(images["empty"])),
        "truncated": ImageRef("truncated.png", path=str(images["truncated"])),
        "bomb": ImageRef("bomb.png", path=str(images["bomb"])),
        "missing": ImageRef("missing.png", path=str(images["a.png"].parent / "missing.png")),
        "outside": ImageRef("outside.png", path=str(outside)),
        "inline junk": ImageRef("junk", data=b"\x00" * 50),
        "good": ImageRef("a.png", path=str(images["a.png"])),
        "bad target": ImageRef("b.jpg", path=str(images["b.jpg"])),
    }
    targets: list = [None] * len(cases)
    targets[-1] = 99
    small = load_settings(store_url=store.url, allowed_roots=settings.allowed_roots,
                          max_image_pixels=50_000_000)
    summary = run_job(spec_for(sha, list(cases.values()), targets=targets), store,
                      ModelCache(store, 1, "cpu", small.limits), small)
    codes = {name: (s.get("error") or {}).get("code", "ok")
             for name, s in zip(cases, summary["images"])}
    assert codes == {
        "text": "bad_image", "empty": "bad_image", "truncated": "bad_image",
        "bomb": "bad_image", "missing": "missing_image", "outside": "forbidden_path",
        "inline junk": "bad_image", "good": "ok", "bad target": "bad_target",
    }
    for s in summary["images"]:
        record = json.loads(store.get(f"jobs/job-1/{s['index']:05d}.json"))
        assert record["status"] == s["status"]
        if s["status"] == "error":
            assert record["error"]["message"]
            assert not store.exists(f"jobs/job-1/{s['index']:05d}.npy")
    assert "decompression bomb" in summary["images"][3]["error"]["message"]


def test_run_job_twice_writes_the_same(bundle: bytes, store: Store, settings,
                                       images: dict[str, Path]) -> None:
    sha = store.put_bundle(bundle)
    refs = [ImageRef(n, path=str(images[n])) for n in ("a.png", "b.jpg", "c.png")]
    cache = ModelCache(store, 1, "cpu")
    run_job(spec_for(sha, refs), store, cache, settings)
    root = Path(store.root) / "jobs" / "job-1"
    first = {p.name: p.read_bytes() for p in sorted(root.iterdir())}
    assert len(first) == 13  # four files per image, and the summary
    run_job(spec_for(sha, refs), store, cache, settings)  # a redelivery: all done already
    assert {p.name: p.read_bytes() for p in sorted(root.iterdir())} == first
    # A worker that died after image 0: the rerun computes 1 and 2 again, identically.
    for name in ("00001.json", "00002.json", "00002.npy", "00002.png"):
        (root / name).unlink()
    run_job(spec_for(sha, refs), store, cache, settings)
    again = {p.name: p.read_bytes() for p in sorted(root.iterdir())}
    assert set(again) == set(first)
    for name, data in first.items():
        if name.startswith("0") and name.endswith(".json"):  # but for the time it took
            old, new = json.loads(data), json.loads(again[name])
            old.pop("timings"), new.pop("timings")
            assert old == new
        else:
            assert again[name] == data, name


def test_small_batches_give_the_same_records(monkeypatch: pytest.MonkeyPatch, bundle: bytes,
                                             store: Store, settings,
                                             images: dict[str, Path]) -> None:
    """Batches of two: each is decoded while the one before runs and stored while the
    next runs; every image still gets its own record, as one big batch gives it."""
    import onnxcam.worker.jobs

    sha = store.put_bundle(bundle)
    names = ["a.png", "text", "b.jpg", "c.png", "a.png"]
    refs = [ImageRef(n, path=str(images[n])) for n in names]
    targets: list = [None, None, 3, None, 1]
    whole = run_job(JobSpec("whole", sha, refs, "gradcam", targets), store,
                    ModelCache(store, 1, "cpu"), settings)
    monkeypatch.setattr(onnxcam.worker.jobs, "DEFAULT_BATCH", {"cpu": 2})
    pairs = run_job(JobSpec("pairs", sha, refs, "gradcam", targets), store,
                    ModelCache(store, 1, "cpu"), settings)
    assert [s["index"] for s in pairs["images"]] == list(range(len(names)))
    assert [s["status"] for s in pairs["images"]] == ["ok", "error", "ok", "ok", "ok"]
    for index in range(len(names)):
        one, two = (json.loads(store.get(f"jobs/{job}/{index:05d}.json"))
                    for job in ("whole", "pairs"))
        if one["status"] == "error":
            assert (two["image"], two["error"]) == (one["image"], one["error"])
            continue
        # onnxruntime's sums may round differently at another batch size: close, not equal.
        assert_close(two["logits"], one["logits"], 1e-5, "logits")
        assert (two["image"], two["target"], two["image_size"]) == \
            (one["image"], one["target"], one["image_size"]), index
        assert one["target"] == (targets[index] if targets[index] is not None
                                 else int(np.argmax(one["logits"])))
        raw_one, raw_two = (np.load(io.BytesIO(store.get(f"jobs/{job}/{index:05d}.raw.npy")))
                            for job in ("whole", "pairs"))
        assert_close(raw_two, raw_one, 1e-5, "raw map")
    assert whole["ok"] == pairs["ok"] == 4


def test_job_wide_errors(bundle: bytes, store: Store, settings,
                         images: dict[str, Path]) -> None:
    refs = [ImageRef("a.png", path=str(images["a.png"]))]
    cache = ModelCache(store, 1, "cpu")
    with pytest.raises(UnknownBundleError, match="no bundle"):
        run_job(spec_for("0" * 64, refs), store, cache, settings)
    with pytest.raises(UnknownBundleError, match="not a bundle hash"):
        run_job(spec_for("../../etc/passwd", refs), store, cache, settings)
    sha = store.put_bundle(bundle)
    with pytest.raises(BadMethodError, match="unknown method"):
        run_job(spec_for(sha, refs, method="nonsense"), store, cache, settings)


def test_model_cache_is_bounded_and_checks_hashes(bundle: bytes, store: Store) -> None:
    other = onnx.load_from_string(bundle)
    other.doc_string = "another bundle"
    first, second = store.put_bundle(bundle), store.put_bundle(other.SerializeToString())
    cache = ModelCache(store, 1, "cpu")
    explainer = cache.get(first)
    assert cache.get(first) is explainer
    cache.get(second)
    assert cache.get(first) is not explainer  # evicted, then loaded again
    (Path(store.root) / "bundles" / f"{second}.onnx").write_bytes(bundle)  # tampered
    with pytest.raises(StoreError, match="does not match"):
        ModelCache(store, 1, "cpu").get(second)


# ---------------------------------------------------------------------------- store, settings


def test_local_store(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    uri = store.put("jobs/x/1.json", b"{}")
    assert Path(uri).read_bytes() == b"{}" and store.exists("jobs/x/1.json")
    assert store.owns(uri) == "jobs/x/1.json" and store.owns("/etc/passwd") is None
    assert [p.name for p in (tmp_path / "s" / "jobs" / "x").iterdir()] == ["1.json"]
    with pytest.raises(StoreError):
        store.put("../escape", b"")
    assert store.put_bundle(b"bytes") == hashlib.sha256(b"bytes").hexdigest()
    assert store.find("jobs/x/none.json") is None and store.find("jobs/x/1.json") == b"{}"


def test_the_store_layout_is_the_documented_one(tmp_path: Path) -> None:
    """Users and scripts read these keys: they are pinned here, spelled out."""
    sha = hashlib.sha256(b"model").hexdigest()
    assert bundle_key(sha) == f"bundles/{sha}.onnx"
    keys = [image_key("j-1", 7, suffix) for suffix in (HEATMAP, OVERLAY, RAW, RECORD)]
    assert keys == ["jobs/j-1/00007.npy", "jobs/j-1/00007.png", "jobs/j-1/00007.raw.npy",
                    "jobs/j-1/00007.json"]
    for not_a_hash in (sha.upper(), sha[:-1], "../" + sha[3:], f"{sha}/x"):
        with pytest.raises(UnknownBundleError, match="not a bundle hash"):
            bundle_key(not_a_hash)
    store = Store(str(tmp_path / "s"))
    assert read_record(store, "j-1", 7) is None and read_error(store, "j-1") is None
    store.put("jobs/j-1/00007.json", b'{"index": 7, "status": "ok"}')
    store.put("jobs/j-1/error.json", b'{"code": "time_limit", "message": "slow"}')
    assert read_record(store, "j-1", 7) == {"index": 7, "status": "ok"}
    assert read_error(store, "j-1") == {"code": "time_limit", "message": "slow"}


def test_unreachable_s3_is_transient() -> None:
    pytest.importorskip("s3fs")
    from service import free_port

    store = Store("s3://bucket/prefix", anon=True,
                  client_kwargs={"endpoint_url": f"http://127.0.0.1:{free_port()}"},
                  config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        store.get("bundles/x.onnx")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXCAM_ALLOWED_ROOTS", "/data:/srv/images:s3://bucket/in")
    monkeypatch.setenv("ONNXCAM_VISIBILITY_TIMEOUT", "42")
    monkeypatch.setenv("ONNXCAM_BROKER_URL", "rediss://:secret@redis.example:6380/1")
    settings = load_settings()
    assert settings.roots == ["/data", "/srv/images", "s3://bucket/in"]
    assert settings.visibility_timeout == 42
    assert settings.backend_url == settings.broker_url
    monkeypatch.setenv("ONNXCAM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(SettingsError, match="ONNXCAM_MAX_IMAGE_PIXELS"):
        load_settings()


def test_inline_data_is_base64_on_the_wire(images: dict[str, Path]) -> None:
    data = images["a.png"].read_bytes()
    message = JobSpec("j", "f" * 64, [ImageRef("a.png", data=data)]).to_message()
    assert base64.b64decode(message["images"][0]["data"]) == data


# ---------------------------------------------------------------------------- the task body


class FlakyStore(Store):
    """A real local store whose reads fail the first ``failures`` times, as a network would."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url)
        self.failures = failures
        self.reads = 0

    def get(self, key: str) -> bytes:
        self.reads += 1
        if self.reads <= self.failures:
            raise StoreUnavailableError(f"{key}: store unavailable (connection reset)")
        return super().get(key)


def run_task(monkeypatch: pytest.MonkeyPatch, store: Store, settings, message: dict,
             job_id: str):  # noqa: ANN201 - EagerResult
    import onnxcam.worker.tasks

    cache = ModelCache(store, 1, "cpu")
    monkeypatch.setattr(onnxcam.worker.tasks, "process_state",
                        lambda: (settings, store, cache))
    return onnxcam.worker.tasks.explain.apply(args=[message], task_id=job_id, throw=False)


def test_task_retries_transient_store_failures(monkeypatch: pytest.MonkeyPatch, bundle: bytes,
                                               settings, images: dict[str, Path],
                                               tmp_path: Path) -> None:
    flaky = FlakyStore(str(tmp_path / "flaky"), failures=2)
    sha = flaky.put_bundle(bundle)
    message = spec_for(sha, [ImageRef("a.png", path=str(images["a.png"]))]).to_message()
    result = run_task(monkeypatch, flaky, settings, message, "job-flaky")
    assert result.successful(), result.result
    assert result.result["ok"] == 1 and flaky.failures == 2 and flaky.reads > 2


def test_task_never_retries_bad_input(monkeypatch: pytest.MonkeyPatch, bundle: bytes,
                                      settings, store: Store,
                                      images: dict[str, Path]) -> None:
    import onnxcam.worker.tasks

    assert StoreUnavailableError in onnxcam.worker.tasks.RETRY_FOR
    assert not any(issubclass(MalformedJobError, e) for e in onnxcam.worker.tasks.RETRY_FOR)
    result = run_task(monkeypatch, store, settings, {"v": 1, "images": 3}, "job-bad")
    assert result.failed() and isinstance(result.result, MalformedJobError)
    assert result.traceback is not None
    recorded = json.loads(store.get("jobs/job-bad/error.json"))
    assert recorded["code"] == "malformed_job"


def test_no_broker_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, folder: Path,
                                      bundle: bytes, images: dict[str, Path]) -> None:
    from click.testing import CliRunner
    from service import free_port

    from onnxcam.cli import main

    (folder / "b.onnx").write_bytes(bundle)
    monkeypatch.setenv("ONNXCAM_BROKER_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("ONNXCAM_STORE_URL", str(folder / "store"))
    for args in (["submit", str(folder / "b.onnx"), str(images["a.png"])], ["status", "x"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith("onnxcam: error: cannot reach the broker at redis://:**@")
        assert "secret" not in line


def test_submit_refuses_what_is_no_bundle_before_the_broker(
        monkeypatch: pytest.MonkeyPatch, folder: Path, images: dict[str, Path]) -> None:
    """The client's bundle check is the engine's reader: one BundleError naming the file,
    raised before the broker (nothing listens at its port) is asked, and the CLI's
    one line and exit status 2."""
    from click.testing import CliRunner
    from service import free_port

    from onnxcam.cli import main
    from onnxcam.worker.client import submit

    monkeypatch.setenv("ONNXCAM_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("ONNXCAM_STORE_URL", str(folder / "refused-store"))
    missing, plain, junk = folder / "missing.onnx", folder / "plain.onnx", folder / "junk.onnx"
    onnx.save(models.onnx_cnn(), str(plain))
    junk.write_bytes(b"not onnx at all")
    cases = {
        missing: f"{missing}: cannot read the bundle (No such file or directory)",
        plain: f"{plain}: not an onnxcam bundle: no onnxcam.format_version metadata",
        junk: f"{junk}: not an ONNX file",
    }
    for path, message in cases.items():
        with pytest.raises(BundleError) as caught:
            submit(path, [str(images["a.png"])])
        assert str(caught.value) == message
        result = CliRunner().invoke(main, ["submit", str(path), str(images["a.png"])])
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == f"onnxcam: error: {message}\n"
    assert not (folder / "refused-store" / "bundles").exists()


def test_worker_help_lists_every_setting() -> None:
    from click.testing import CliRunner

    from onnxcam.cli import main
    from onnxcam.worker.settings import Settings

    shown = CliRunner().invoke(main, ["worker", "--help"])
    assert shown.exit_code == 0
    for name in Settings.model_fields:
        assert f"ONNXCAM_{name.upper()}:" in shown.stdout
    for required in ("ONNXCAM_BROKER_URL", "ONNXCAM_RESULT_BACKEND", "ONNXCAM_STORE_URL",
                     "ONNXCAM_ALLOWED_ROOTS", "ONNXCAM_VISIBILITY_TIMEOUT",
                     "ONNXCAM_SOFT_TIME_LIMIT", "ONNXCAM_TIME_LIMIT", "ONNXCAM_MAX_IMAGE_BYTES",
                     "ONNXCAM_MAX_IMAGE_PIXELS", "ONNXCAM_MODEL_CACHE",
                     "ONNXCAM_MAX_MEMORY_PER_CHILD"):
        assert required in shown.stdout


def test_sampling_options_reach_the_engine(folder: Path, store: Store, settings,
                                           images: dict[str, Path], cnn_source: Path) -> None:
    gradient_bundle = export(cnn_source, folder / "cnn.ig.onnx", labels=LABELS,
                             input_gradients=True).path.read_bytes()
    sha = store.put_bundle(gradient_bundle)
    knobs = {"samples": 3, "noise": 0.3, "seed": 7}
    spec = JobSpec("job-sg", sha, [ImageRef("a.png", path=str(images["a.png"]))],
                   "smoothgrad", [None], 0, knobs)
    run_job(spec, store, ModelCache(store, 1, "cpu"), settings)
    raw = np.load(io.BytesIO(store.get("jobs/job-sg/00000.raw.npy")))
    explainer = Explainer(gradient_bundle, device="cpu")
    expected = explainer.explain(str(images["a.png"]), method="smoothgrad", **knobs)
    assert_close(raw, expected.raw[0], 1e-6, "smoothgrad with the job's options")
    default = explainer.explain(str(images["a.png"]), method="smoothgrad")
    assert np.abs(default.raw[0] - expected.raw[0]).max() > 1e-3  # the options mattered


def test_eigen_smooth_reaches_the_engine(folder: Path, store: Store, settings,
                                        images: dict[str, Path], cnn_source: Path) -> None:
    bundle = export(cnn_source, folder / "cnn.eigen.onnx", labels=LABELS).path.read_bytes()
    sha = store.put_bundle(bundle)
    spec = JobSpec("job-eigen", sha, [ImageRef("a.png", path=str(images["a.png"]))],
                   "layercam", [None], 0, {"eigen_smooth": True})
    run_job(spec, store, ModelCache(store, 1, "cpu"), settings)
    raw = np.load(io.BytesIO(store.get("jobs/job-eigen/00000.raw.npy")))
    explainer = Explainer(bundle, device="cpu")
    expected = explainer.explain(str(images["a.png"]), method="layercam", eigen_smooth=True)
    assert_close(raw, expected.raw[0], 1e-6, "layercam with eigen_smooth")
    plain = explainer.explain(str(images["a.png"]), method="layercam")
    assert np.abs(plain.raw[0] - expected.raw[0]).max() > 1e-6  # the option mattered


@pytest.mark.parametrize("channels", [1, 3])
def test_a_letterbox_bundle_is_letterboxed_by_the_worker_too(channels: int) -> None:
    """The worker's decode-and-resize shortcut places an image in a letterbox bundle's
    input as the engine does (padded grey, aspect kept), not stretched."""
    from onnxcam.engine.images import resize
    from onnxcam.worker.jobs import _resized

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 50, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    got = _resized(image, 32, 32, "letterbox")
    assert got.shape == (32, 32, channels)
    np.testing.assert_array_equal(got, resize(pixels, 32, 32, "letterbox"))
    assert (got[0] == 114).all() and (got[-1] == 114).all()  # padded above and below

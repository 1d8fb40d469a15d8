"""Many targets per image in jobs, run without a broker: the message's targets (classes,
all-positive, top:k, contrasts, lists), one row per image and target held against the
engine run locally, today's files and records for one class, bad targets per image."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import models
import numpy as np
import pytest
from checks import assert_close
from PIL import Image
from service import write_noise_images

from onnxcam.engine import Explainer
from onnxcam.engine.maps import heatmaps
from onnxcam.engine.targets import Contrast
from onnxcam.errors import MalformedJobError
from onnxcam.exporter import export
from onnxcam.runtime import cpu_session
from onnxcam.worker.client import _per_image, job_records
from onnxcam.worker.jobs import ModelCache, run_job
from onnxcam.worker.message import ImageRef, JobSpec, parse_job
from onnxcam.worker.settings import load_settings
from onnxcam.worker.store import Store

README = Path(__file__).resolve().parents[2] / "README.md"
# The keys of a one-class record, as workers wrote them before targets were lists.
ONE_CLASS_KEYS = {"job", "index", "image", "status", "bundle", "method", "target", "label",
                  "logits", "top", "flat", "image_size", "files", "timings"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("job-targets")


@pytest.fixture(scope="module")
def bundle(folder: Path) -> Path:
    """A multi-label bundle (six raw scores, sigmoid head) cut at its layer."""
    out = folder / "skip.cam.onnx"
    export(models.onnx_skip_head(), out, layer="last_relu", head="sigmoid")
    return out


@pytest.fixture(scope="module")
def images(folder: Path) -> list[Path]:
    root = folder / "images"
    paths = write_noise_images(root, 3)
    (root / "notes.txt").write_text("not an image\n")
    Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(root / "mask.png")
    return paths


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def run(spec: JobSpec, store: Store, roots: Path) -> list[dict[str, Any]]:
    settings = load_settings(store_url=store.url, allowed_roots=str(roots), device="cpu")
    run_job(spec, store, ModelCache(store, 2, "cpu"), settings)
    return job_records(spec.job_id, store)


def spec_for(store: Store, bundle: Path, images: list[Path], targets: list[Any],
             threshold: float | None = None, job: str = "job-1") -> JobSpec:
    sha = store.put_bundle(bundle.read_bytes())
    refs = [ImageRef(path.name, path=str(path)) for path in images]
    return JobSpec(job, sha, refs, "gradcam", targets, threshold=threshold)


def stored(store: Store, record: dict[str, Any], kind: str) -> np.ndarray:
    return np.load(io.BytesIO(store.get(store.owns(record["files"][kind]))))


def documented_keys() -> set[str]:
    """The record keys the README's table (Worker service, Results) names."""
    text = README.read_text()
    table = text[text.index("**Results** go to the store"):text.index("**Reliability.**")]
    return {key for first in re.findall(r"^\| (`[^|]+) \|", table, re.MULTILINE)
            for key in re.findall(r"`([a-z_]+)`", first)}


def assert_documented(rows: list[dict[str, Any]]) -> None:
    assert set().union(*map(set, rows)) <= documented_keys()


def assert_rows_match(rows: list[dict[str, Any]], expected: Any, store: Store,
                      first: int = 0) -> None:
    """Each row against the engine's: image (``first`` is the engine's image 0), class,
    name, logits, raw map (1e-6) and the stored heatmap (float16 in the store)."""
    assert [(r["index"], r["target"], r["target_name"]) for r in rows] == list(zip(
        (expected.image_index + first).tolist(), expected.targets.tolist(), expected.target_names))
    for position, row in enumerate(rows):
        assert_close(row["logits"], expected.logits[position], 1e-6, "logits")
        assert_close(stored(store, row, "raw"), expected.raw[position], 1e-6, "raw map")
        assert_close(stored(store, row, "heatmap"),
                     heatmaps(expected.raw[position:position + 1], 16, 16)[0], 1e-3, "heatmap")
        assert row["flat"] == bool(expected.flat[position])


def test_all_positive_rows_are_the_engines(bundle: Path, images: list[Path],
                                           store: Store) -> None:
    explainer = Explainer(bundle, device="cpu")
    rows = run(spec_for(store, bundle, images, ["all-positive"] * 3), store, images[0].parent)
    expected = explainer.explain([str(p) for p in images], targets="all-positive")
    assert len(rows) == len(expected.targets) > 3  # several classes for some image
    assert_rows_match(rows, expected, store)
    names = sorted(store.names("jobs/job-1/"))
    assert "00000.3.npy" in names and "00000.json" in names and "00000.npy" not in names


def test_an_image_with_no_class_over_the_threshold_gets_a_record(
        bundle: Path, images: list[Path], store: Store) -> None:
    explainer = Explainer(bundle, device="cpu")
    plain = explainer.explain([str(p) for p in images])  # top-1: every image's logits
    best = plain.probabilities.max(axis=1)
    threshold = float(np.sort(best)[:2].mean())  # the least sure image has none over it
    rows = run(spec_for(store, bundle, images, ["all-positive"] * 3, threshold),
               store, images[0].parent)
    expected = explainer.explain([str(p) for p in images], targets="all-positive",
                                 threshold=threshold)
    empty = int(np.argmin(best))
    (nothing,) = [r for r in rows if r["index"] == empty]
    assert nothing["status"] == "ok" and nothing["targets"] == [] and "files" not in nothing
    # Its scores all the same: the logits, and the top five by a sigmoid in numpy.
    assert_close(nothing["logits"], plain.logits[empty], 1e-6, "logits")
    probabilities = 1 / (1 + np.exp(-np.asarray(nothing["logits"], np.float64)))
    assert [t["class"] for t in nothing["top"]] == np.argsort(-probabilities)[:5].tolist()
    assert [t["score"] for t in nothing["top"]] == pytest.approx(
        np.sort(probabilities)[::-1][:5], abs=1e-6)
    assert "scores" not in nothing  # a classifier's are its logits through its head
    assert_rows_match([r for r in rows if r["index"] != empty], expected, store)
    assert not [n for n in store.names("jobs/job-1/") if n.startswith(f"{empty:05d}.")
                and n != f"{empty:05d}.json"]
    summary = json.loads(store.get("jobs/job-1/summary.json"))
    assert summary["n"] == 3 and summary["ok"] == 3
    assert [line.get("rows") for line in summary["images"]] == [
        sum(1 for r in rows if r["index"] == i and "target_name" in r) for i in range(3)]


def test_contrasts_lists_and_top_k_in_one_job(bundle: Path, images: list[Path],
                                              store: Store) -> None:
    targets = [[0, {"contrast": [1, 2]}, 0], "top:2", 3]
    rows = run(spec_for(store, bundle, images, targets), store, images[0].parent)
    explainer = Explainer(bundle, device="cpu")
    first = explainer.explain(str(images[0]), targets=[[0, Contrast(1, 2), 0]])
    assert_rows_match(rows[:3], first, store)
    assert [r["target_name"] for r in rows[:3]] == ["0", "1-vs-2", "0"]
    names = set(store.names("jobs/job-1/"))
    assert {"00000.0.npy", "00000.1-vs-2.png", "00000.0-1.raw.npy"} <= names
    second = explainer.explain(str(images[1]), targets="top:2")
    assert_rows_match(rows[3:5], second, store, first=1)
    assert set(rows[5]) == ONE_CLASS_KEYS and rows[5]["target"] == 3  # one class: as before
    assert_documented(rows)
    assert {"00002.npy", "00002.png", "00002.raw.npy", "00002.json"} <= names


def test_old_messages_keep_their_files_and_records(bundle: Path, images: list[Path],
                                                   store: Store) -> None:
    for targets in ([None, 2, "4"], [None, [2], ["4"]]):  # a list of one class is one class
        job = f"job-{len(store.names('jobs/'))}"
        rows = run(spec_for(store, bundle, images, targets, job=job), store,
                   images[0].parent)
        assert [set(r) for r in rows] == [ONE_CLASS_KEYS] * 3
        explainer = Explainer(bundle, device="cpu")
        top = int(explainer.explain(str(images[0])).targets[0])
        assert [r["target"] for r in rows] == [top, 2, 4]
        assert sorted(store.names(f"jobs/{job}/")) == sorted(
            f"{i:05d}{suffix}" for i in range(3) for suffix in (".npy", ".png", ".raw.npy",
                                                                ".json")) + ["summary.json"]


def test_a_segmenters_records_carry_every_class_share(images: list[Path], folder: Path,
                                                     store: Store) -> None:
    """A segmenter's records, whether its image got one class, several or none: ``logits``
    null (they are per pixel), ``scores`` every class's share of the pixels, ``top`` the
    five largest; the shares by numpy from the source graph in plain onnxruntime."""
    source = models.onnx_segmenter(seed=2, classes=8)
    bundle = folder / "segmenter.cam.onnx"
    export(source, bundle, layer="last_relu", preprocess="unit")
    pixels = np.stack([np.asarray(Image.open(path)) for path in images])
    scores = cpu_session(source.SerializeToString()).run(
        None, {"input": (pixels / 255).astype(np.float32).transpose(0, 3, 1, 2)})[0]
    shares = np.stack([np.bincount(w.ravel(), minlength=8) / w.size
                       for w in scores.argmax(axis=1)])
    assert (shares > 0).sum(axis=1).max() > 5  # more classes win pixels than a top lists
    two = [int(c) for c in np.argsort(-shares[1])[:2]]
    rows = run(spec_for(store, bundle, images, [None, two, "all-positive"], threshold=0.99),
               store, images[0].parent)
    assert set(rows[0]) == ONE_CLASS_KEYS | {"scores"}  # the old keys, and the shares
    assert_documented(rows)
    assert [r["index"] for r in rows] == [0, 1, 1, 2] and rows[3]["targets"] == []
    for row in rows:
        assert row["logits"] is None
        np.testing.assert_allclose(row["scores"], shares[row["index"]], atol=1e-7)
        top = row["top"]
        assert [t["score"] for t in top] == pytest.approx(
            np.sort(shares[row["index"]])[::-1][:5], abs=1e-7)
        assert all(t["score"] == pytest.approx(shares[row["index"]][t["class"]], abs=1e-7)
                   for t in top)


def test_bad_targets_end_their_image_only(bundle: Path, images: list[Path],
                                          store: Store) -> None:
    root = images[0].parent
    cases = {
        "one-sided contrast": {"contrast": [0]},
        "top:0": "top:0",
        "weights not numbers": {"weights": "many"},
        "empty list": [],
        "long label": "L" * 100_000,
        "too many": [0] * 1001,
        "weights of the wrong shape": {"weights": [1.0, 2.0]},
        "region of a classifier": {"region": 0},
        "null in a list": [None],
        "no class -1": -1,
        "a float": 2.5,
        "mask outside the roots": {"region": 0, "mask": "/etc/passwd"},
        "mask not an image": {"region": 0, "mask": str(root / "notes.txt")},
        "mask that is no reference": {"region": 0, "mask": 7},
    }
    paths = [images[0]] * len(cases) + [images[1]]
    rows = run(spec_for(store, bundle, paths, [*cases.values(), [0, 1]]), store, root)
    codes = {name: row["error"]["code"] for name, row in zip(cases, rows)}
    assert codes == {**dict.fromkeys(cases, "bad_target"),
                     "mask outside the roots": "forbidden_path",
                     "mask not an image": "bad_image"}
    assert all(len(row["error"]["message"]) < 600 for row in rows[:len(cases)])
    assert_documented(rows)
    assert [(r["status"], r["target"]) for r in rows[len(cases):]] == [("ok", 0), ("ok", 1)]


def test_a_readable_mask_reaches_the_engine(bundle: Path, images: list[Path],
                                            store: Store) -> None:
    """The mask is fetched and decoded as an image; this bundle then refuses regions
    (segmentation only) rather than the mask."""
    rows = run(spec_for(store, bundle, images[:1],
                        [{"region": 0, "mask": str(images[0].parent / "mask.png")}]),
               store, images[0].parent)
    assert rows[0]["error"]["code"] == "bad_target"
    assert "segmentation" in rows[0]["error"]["message"]


def test_message_targets_and_threshold() -> None:
    job = {"v": 1, "bundle": "f" * 64, "method": "gradcam",
           "images": [{"path": "a"}, {"path": "b"}]}
    targets = [["all-positive", {"contrast": ["cat", 2]}], {"weights": [0.5, -1]}]
    spec = parse_job({**job, "targets": targets, "threshold": 0.25}, "id")
    assert spec.targets == targets and spec.threshold == 0.25
    assert parse_job(json.loads(json.dumps(spec.to_message())), "id") == spec
    assert "threshold" not in parse_job(job, "id").to_message()  # old digests stay
    for threshold in (0, 1, -0.5, float("nan"), "0.5", True):
        with pytest.raises(MalformedJobError, match="threshold"):
            parse_job({**job, "threshold": threshold}, "id")


def test_client_targets_as_json() -> None:
    assert _per_image(None, 2) == [None, None]
    assert _per_image("all-positive", 2) == ["all-positive"] * 2
    assert _per_image(Contrast("cat", 1), 1) == [{"contrast": ["cat", 1]}]
    assert _per_image([[3, "top:2"], None], 2) == [[3, "top:2"], None]
    assert _per_image([np.int64(4), {"region": 1, "mask": "s3://b/m.png"}], 2) == [
        4, {"region": 1, "mask": "s3://b/m.png"}]

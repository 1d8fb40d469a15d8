"""A segmentation manifest audited with a real segmentation bundle (``onnxcam.output =
pixels``), in-process and over two real workers: each class's map against Grad-CAM by
hand from the model's own activations (plain onnxruntime on the source graph), and the
energy in its true mask, the pixel shares and the predicted classes by numpy; also a
segmenter of eight classes, more of which win pixels of an image than a record's top
lists."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import write_manifest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from service import free_port, service_env, start_redis, start_worker
from test_audit_targets import palette_png

from onnxcam.errors import AuditError
from onnxcam.exporter import export
from onnxcam.runtime import cpu_session

ROOT = Path(__file__).resolve().parents[2]
SIZE, CLASSES = 16, 4
LABELS = ["sky", "road", "car", "tree"]
WIDE = ["sky", "road", "car", "tree", "bus", "wall", "sign", "bike"]


def segmenter(classes: int = CLASSES, seed: int = 38) -> onnx.ModelProto:
    """NCHW [N, 3, 16, 16]: a stride-2 conv, ReLU (``relu``, 8x8), a 1x1 conv to
    ``classes`` scores per pixel [N, classes, 8, 8]. Random weights, no two alike."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
             for name, shape in (("w1", (6, 3, 3, 3)), ("b1", (6,)), ("w2", (classes, 6, 1, 1)),
                                 ("b2", (classes,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["conv"], name="conv",
                              pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Conv", ["relu", "w2", "b2"], ["scores"], name="classes")]
    graph = helper.make_graph(
        nodes, "segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes, 8, 8])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def reference(model: onnx.ModelProto, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The source graph's scores [K, 8, 8] and ReLU activations [6, 8, 8] for one uint8
    HWC image, ``unit`` preprocessing (x / 255)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, None))
    session = cpu_session(probe.SerializeToString())
    x = (pixels.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    scores, activations = session.run(["scores", "relu"], {"input": x})
    return scores[0], activations[0]


def gradcam_by_hand(model: onnx.ModelProto, activations: np.ndarray, scores: np.ndarray,
                    cls: int) -> np.ndarray:
    """Grad-CAM of the class summed over the pixels it wins: d/dA_k of that sum is
    w2[cls, k] at those pixels, so each channel's weight is w2[cls, k] times their share."""
    w2 = numpy_helper.to_array(model.graph.initializer[2])[:, :, 0, 0]
    share = (scores.argmax(axis=0) == cls).mean()
    return np.maximum(np.einsum("khw,k->hw", activations, w2[cls] * share), 0)


def energy_by_hand(raw: np.ndarray, mask: np.ndarray) -> float:
    """The README's heatmap (min-max normalised, half-pixel bilinear to the image,
    as cv2.resize) and its mass inside ``mask``."""
    span = raw.max() - raw.min()
    unit = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
    heatmap = cv2.resize(unit.astype(np.float32), mask.shape[::-1],
                         interpolation=cv2.INTER_LINEAR).astype(np.float64)
    total = heatmap.sum()
    return float(heatmap[mask].sum() / total) if total > 0 else 0.0  # a flat map: 0


def audit_case(folder: Path, model: onnx.ModelProto, labels: list[str],
               classes_of: Callable[[int, np.ndarray], list[int]]) -> dict:
    """The bundle, four random 16x16 images and a manifest whose masks hold blocks of
    the three classes ``classes_of(number, pixels)`` picks, void elsewhere."""
    bundle = folder / "seg.cam.onnx"
    export(model, bundle, layer="relu", preprocess="unit", labels=labels)
    rng = np.random.default_rng(2)
    rows, images = [], []
    for number in range(4):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{number}.png")
        first, second, third = classes_of(number, pixels)
        ids = np.full((SIZE, SIZE), 255, np.uint8)
        ids[:8, :], ids[8:, :10], ids[8:, 10:] = first, second, third
        palette_png(folder / f"{number}_ids.png", ids)
        rows.append([f"{number}.png", f"{number}_ids.png"])
        images.append((pixels, ids))
    manifest = write_manifest(folder / "seg.csv", rows, header=("image", "segmentation"))
    return {"folder": folder, "model": model, "bundle": bundle, "manifest": manifest,
            "images": images, "labels": labels}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four classes, each winning pixels of every image (seed 38)."""
    return audit_case(tmp_path_factory.mktemp("audit_segmenter"), segmenter(), LABELS,
                      lambda number, _: [(number + k) % CLASSES for k in range(3)])


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Eight classes, six or seven winning pixels of three images (seed 58); each mask
    holds an image's largest class, its sixth (past a record's top five) and its
    smallest (no pixels, where fewer than eight win)."""
    model = segmenter(len(WIDE), seed=58)

    def classes_of(number: int, pixels: np.ndarray) -> list[int]:
        scores, _ = reference(model, pixels)
        shares = np.bincount(scores.argmax(axis=0).ravel(), minlength=len(WIDE))
        order = np.argsort(-shares, kind="stable")
        return [int(order[0]), int(order[min(5, np.count_nonzero(shares) - 1)]),
                int(order[-1])]

    return audit_case(tmp_path_factory.mktemp("audit_wide_segmenter"), model, WIDE,
                      classes_of)


def audit(case: dict, out: Path, *args: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "onnxcam.cli", "audit", str(case["manifest"]), "--model",
         str(case["bundle"]), "--out", str(out), "--clusters-sample", "0", *args],
        env={**os.environ, **(env or {})}, cwd=ROOT, capture_output=True, text=True,
        timeout=180)
    assert done.returncode == 0, done.stderr


def lines(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def assert_by_hand(case: dict, out: Path) -> None:
    got = lines(out)
    labels = case["labels"]
    assert len(got) == 4 * 3  # three classes in each true mask
    for line in got:
        pixels, ids = case["images"][int(line["row"])]
        scores, activations = reference(case["model"], pixels)
        cls = labels.index(line["explained"])
        assert line["label"] == line["explained"] and line["status"] == "ok"
        path = Path(line["heatmap"])
        raw = np.load(path if path.is_absolute() else out / path).astype(np.float64)
        want = gradcam_by_hand(case["model"], activations, scores, cls)
        np.testing.assert_allclose(raw, want, atol=2e-3 * max(want.max(), 1e-6))
        assert float(line["energy_in_box"]) == pytest.approx(energy_by_hand(raw, ids == cls),
                                                             abs=1e-3)
        shares = np.bincount(scores.argmax(axis=0).ravel(), minlength=len(labels)) / 64
        assert float(line["score"]) == pytest.approx(shares[cls], abs=1e-4)
        assert line["pred"] == "|".join(labels[k] for k in np.flatnonzero(shares))
        assert line["correct"] == str(int(shares[cls] > 0))


def test_a_segmentation_bundle_audited_in_process(case: dict, tmp_path: Path) -> None:
    audit(case, tmp_path / "local")
    assert_by_hand(case, tmp_path / "local")


def test_more_classes_than_a_top_in_process(wide: dict, tmp_path: Path) -> None:
    audit(wide, tmp_path / "local")
    assert_by_hand(wide, tmp_path / "local")
    assert max(line["pred"].count("|") + 1 for line in lines(tmp_path / "local")) > 5


@pytest.mark.slow
def test_segmentation_bundles_audited_over_two_workers(case: dict, wide: dict,
                                                       tmp_path: Path) -> None:
    """Four classes, and eight: over workers a record's ``scores`` give every class's
    share of the pixels, so a class past its ``top`` five reads its own."""
    redis = start_redis(tmp_path, free_port())
    folders = f"{case['folder']}:{wide['folder']}"
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", tmp_path / "store", folders)
    workers = [start_worker(f"w{n}", env, tmp_path) for n in (1, 2)]
    try:
        for worker in workers:
            worker.wait_ready()
        for name, found in (("four", case), ("eight", wide)):
            audit(found, tmp_path / name, "--broker", env["ONNXCAM_BROKER_URL"],
                  "--chunk-size", "1", env=env)
    finally:
        for worker in workers:
            worker.stop()
        redis.stop()
    assert_by_hand(case, tmp_path / "four")
    assert_by_hand(wide, tmp_path / "eight")
    assert all("succeeded" in worker.text() for worker in workers)


def test_record_scores_over_workers() -> None:
    """A classifier's record gives its logits, a segmenter's its ``scores`` (every class's
    share of the pixels); a record of neither, or of another class count, is the row's
    error, not a guess."""
    from onnxcam.audit.distributed import record_scores

    shares = [0.5, 0, 0.125, 0.125, 0.0625, 0.0625, 0.0625, 0.0625]
    logits, scores = record_scores({"image": "0.png", "logits": None, "scores": shares}, 8)
    assert logits is None and scores.tolist() == shares  # type: ignore[union-attr]
    logits, scores = record_scores({"image": "0.png", "logits": [1.5, -2.0]}, 2)
    assert scores is None and logits.tolist() == [1.5, -2.0]  # type: ignore[union-attr]
    for record, words in (({"image": "0.png", "logits": None, "top": []}, "no logits"),
                          ({"image": "0.png", "logits": None, "scores": shares[:5]}, "5 scores")):
        with pytest.raises(AuditError, match=words):
            record_scores(record, 8)

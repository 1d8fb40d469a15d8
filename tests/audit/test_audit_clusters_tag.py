"""SpRAy on a Clever Hans made in the test: 30% of one class's training images carry a
bright tag in a corner, a small CNN learns it, and the audit, told nothing about the
tag, must put the tagged held-out images in a cluster of their own."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from checks import chromium, screenshot
from PIL import Image

pytestmark = pytest.mark.tf

SIZE = 32
LABELS = ("disc", "square")
TAGGED = 0.3  # share of the disc images with the tag, in training and held out
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 60


def picture(label: str, tagged: bool, rng: np.random.Generator) -> np.ndarray:
    """A grey noisy background with a disc or a square in the middle; the tag is a
    white 4x4 square in the top-left corner, where no shape ever reaches."""
    image = rng.integers(60, 120, (SIZE, SIZE, 3)).astype(np.uint8)
    colour = rng.integers(140, 230, 3)
    centre = rng.uniform(13, 19, 2)
    radius = rng.uniform(4, 7)
    ys, xs = np.mgrid[:SIZE, :SIZE] + 0.5
    if label == "disc":
        inside = (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius ** 2
    else:
        inside = (np.abs(ys - centre[0]) <= radius * 0.85) & (np.abs(xs - centre[1])
                                                              <= radius * 0.85)
    image[inside] = colour
    if tagged:
        image[1:5, 1:5] = 255
    return image


def data_set(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    images, labels, tags = [], [], []
    for index in range(per_class):
        for label_index, label in enumerate(LABELS):
            tagged = label == "disc" and index < round(TAGGED * per_class)
            images.append(picture(label, tagged, rng))
            labels.append(label_index)
            tags.append(tagged)
    return np.stack(images), np.array(labels), np.array(tags)


def train(images: np.ndarray, labels: np.ndarray):  # type: ignore[no-untyped-def]
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="last_conv"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(len(LABELS), activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32) / 255, labels, batch_size=32, epochs=16,
              shuffle=True, verbose=0)
    return model


@pytest.fixture(scope="module")
def tag_audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The audit's folder, and which manifest rows carry the tag (kept from the audit)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    from onnxcam.audit import AuditOptions, LocalBackend, run_audit
    from onnxcam.engine import Explainer
    from onnxcam.exporter import export

    folder = tmp_path_factory.mktemp("tag")
    model = train(*data_set(TRAIN_PER_CLASS, np.random.default_rng(1))[:2])
    model.save(folder / "tag.keras")
    export(folder / "tag.keras", folder / "tag.onnx", labels=list(LABELS), preprocess="unit")
    images, labels, tags = data_set(TEST_PER_CLASS, np.random.default_rng(2))
    (folder / "images").mkdir()
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label"])
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(folder / "images" / f"{index:03d}.png")
            writer.writerow([str(folder / "images" / f"{index:03d}.png"), LABELS[label]])
    out = folder / "audit-out"
    run_audit(folder / "manifest.csv", out,
              LocalBackend(Explainer(folder / "tag.onnx", device="cpu")), AuditOptions())
    return out, tags


def test_the_tagged_images_form_their_own_cluster(tag_audit: tuple[Path, np.ndarray]) -> None:
    out, tags = tag_audit
    summary = json.loads((out / "summary.json").read_text())
    disc = summary["clusters"]["per_class"]["disc"]
    tagged = set(np.flatnonzero(tags).tolist())
    assert disc["sampled"] == disc["rows"] == TEST_PER_CLASS
    members = [set(cluster["members"]) for cluster in disc["clusters"]]
    best = max(members, key=lambda found: len(found & tagged))
    purity, recall = len(best & tagged) / len(best), len(best & tagged) / len(tagged)
    assert purity >= 0.9 and recall >= 0.9, (disc["sizes"], purity, recall)
    assert disc["note"] == "a minority strategy: look here"
    assert set(disc["clusters"][disc["minority"]["cluster"]]["members"]) == best
    # The model solves the task too: the tag is a shortcut, not its only cue.
    assert summary["per_class"]["disc"]["accuracy"] >= 0.8


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless Chromium")
def test_the_minority_strategy_shows_in_the_report(tag_audit: tuple[Path, np.ndarray],
                                                   tmp_path: Path) -> None:
    out, _ = tag_audit
    page = (out / "report.html").read_text()
    assert "disc: a minority strategy: look here" in page.replace("</b>: ", ": ")
    assert "<script" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    picture = tmp_path / "report.png"
    pixels = screenshot(out / "report.html", picture, 1200, 6000).astype(np.int16)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]

    def near(colour: tuple[int, int, int]) -> int:
        return int(((abs(red - colour[0]) < 12) & (abs(green - colour[1]) < 12)
                    & (abs(blue - colour[2]) < 12)).sum())

    assert near((217, 119, 6)) > 300, "no amber minority banner"
    # Dots of both clusters in the embedding (blue: the first, orange: the second).
    assert near((47, 111, 176)) > 100 and near((224, 123, 0)) > 100

"""Audit fixtures: a tiny bundle (``models.onnx_cnn``, 16x16, 5 labelled classes), its
multi-label twin (sigmoid head) and small images of several sizes, with a manifest
writer."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import models
import numpy as np
import pytest
from PIL import Image

from onnxcam.engine import Explainer

LABELS = models.CNN_LABELS


@pytest.fixture(scope="session")
def audit_bundle(cnn_bundle: Path) -> Path:
    return cnn_bundle


@pytest.fixture(scope="session")
def audit_explainer(audit_bundle: Path) -> Explainer:
    return Explainer(audit_bundle, device="cpu")


@pytest.fixture(scope="session")
def multilabel_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``onnx_multilabel``: 5 raw scores, a sigmoid head, the CNN's labels."""
    from onnxcam.exporter import export

    out = tmp_path_factory.mktemp("audit_ml") / "multilabel.cam.onnx"
    export(models.onnx_multilabel(seed=4, classes=5, squash=False), out, head="sigmoid",
           labels=LABELS)
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.png .. l.png: random RGB pictures of sizes between 12 and 40 pixels."""
    folder = tmp_path_factory.mktemp("audit_images")
    rng = np.random.default_rng(0)
    for name in "abcdefghijkl":
        height, width = (int(v) for v in rng.integers(12, 41, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


ManifestWriter = Callable[[Path, Sequence[Sequence[str]]], Path]


def write_manifest(path: Path, rows: Sequence[Sequence[str]],
                   header: Sequence[str] = ("image", "label", "bbox")) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def manifest_rows(image_folder: Path, count: int) -> list[list[str]]:
    """``count`` rows cycling over the fixture images, labels and boxes."""
    names = sorted(p.name for p in image_folder.glob("*.png"))
    return [[str(image_folder / names[i % len(names)]), LABELS[i % len(LABELS)],
             f"{i % 3} {i % 2} {6 + i % 5} {7 + i % 4}"] for i in range(count)]

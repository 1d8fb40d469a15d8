"""Counts in messages agree with their nouns: 1 image, 2 images."""

from __future__ import annotations

from pathlib import Path

import models
import onnx
import pytest
from click.testing import CliRunner

from onnxcam.cli import main
from onnxcam.words import plural


def test_plural_of_one_and_two() -> None:
    assert [plural(1, "image"), plural(2, "image"), plural(0, "image")] == [
        "1 image", "2 images", "0 images"]
    assert [plural(1, "class"), plural(2, "class"), plural(2, "box")] == [
        "1 class", "2 classes", "2 boxes"]
    assert plural(3, "matrix", "matrices") == "3 matrices"


@pytest.mark.parametrize(("labels", "wanted"), [
    (["cat"], "the labels file has 1 label; the model has 5 classes"),
    (["cat", "dog"], "the labels file has 2 labels; the model has 5 classes"),
])
def test_the_labels_count_agrees(tmp_path: Path, labels: list[str], wanted: str) -> None:
    source = tmp_path / "cnn.onnx"
    onnx.save(models.onnx_cnn(), str(source))
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(tmp_path / "b.onnx"),
                                       "--labels", str(tmp_path / "labels.txt")])
    assert result.exit_code == 2
    assert result.stderr == f"onnxcam: error: {wanted}\n"


@pytest.mark.parametrize(("classes", "wanted"), [(1, ", 1 class, "), (2, ", 2 classes, ")])
def test_the_exported_classes_agree(tmp_path: Path, classes: int, wanted: str) -> None:
    graph = models._Graph(classes)
    flat = graph.node("Flatten", [graph.node("GlobalAveragePool", [models._cnn_trunk(graph)],
                                             "gap")], "flat", axis=1)
    source = tmp_path / "cnn.onnx"
    onnx.save(graph.model("head", graph.gemm(flat, 16, classes, "logits"), classes),
              str(source))
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(tmp_path / "b.onnx")])
    assert result.exit_code == 0, result.output
    assert f"layer last_relu{wanted}analytic gradients" in result.stdout

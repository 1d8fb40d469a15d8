"""A bundle's head: sigmoid heads (multi-label) are known as such, in the metadata, and
the engine's probabilities, ``top``, the faithfulness curves and the audit's score use
them. References are the source models run by their own frameworks (onnxruntime on
the source graph, Keras ``predict``, torch ``forward``) and numpy."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hostile_bundles import with_metadata
from PIL import Image

from onnxcam.audit import AuditOptions, LocalBackend, run_audit
from onnxcam.bundle import read_bundle
from onnxcam.cli import main
from onnxcam.engine import Explainer
from onnxcam.engine.faithfulness import deletion_insertion_auc
from onnxcam.errors import BundleError, ExportError
from onnxcam.exporter import export

FINDINGS = 14
CLOSE = 1e-5  # probabilities against the framework's own, absolute


def pixels(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def unit_nchw(images: np.ndarray) -> np.ndarray:
    """The ``unit`` preprocessing (x / 255), NCHW, as an ONNX or torch source reads it."""
    return (images.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2)


def run_source(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": unit_nchw(images)})[0]


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def numpy_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    """``models.onnx_multilabel`` (14 sigmoid outputs) and its bundle."""
    source = models.onnx_multilabel()
    out = tmp_path_factory.mktemp("heads") / "multilabel.cam.onnx"
    export(source, out)
    return source, out


# --------------------------------------------------------------------------- ONNX


def test_an_onnx_sigmoid_head_gives_the_models_own_probabilities(
        multilabel: tuple[onnx.ModelProto, Path]) -> None:
    source, bundle = multilabel
    assert metadata(bundle)["onnxcam.head"] == "sigmoid"
    images = pixels(4, 16)
    expected = run_source(source, images)
    result = Explainer(bundle, device="cpu").explain(images)
    assert result.info.head == "sigmoid"
    assert np.abs(result.probabilities - expected).max() < CLOSE
    assert not np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-2)  # multi-label
    # top: each class by its own probability, best first.
    for row, want in zip(result.top(FINDINGS), expected):
        order = np.argsort(-want, kind="stable")
        assert [entry["class"] for entry in row] == order.tolist()
        assert [entry["score"] for entry in row] == pytest.approx(want[order], abs=CLOSE)


def test_a_softmax_head_stays_softmax(cnn_source: Path, cnn_bundle: Path) -> None:
    assert metadata(cnn_bundle)["onnxcam.head"] == "softmax"
    images = pixels(4, 16, seed=1)
    expected = run_source(onnx.load(str(cnn_source)), images)
    result = Explainer(cnn_bundle, device="cpu").explain(images)
    assert np.abs(result.probabilities - expected).max() < CLOSE
    assert result.top(1)[0][0]["score"] == pytest.approx(expected[0].max(), abs=CLOSE)


def test_a_bundle_without_the_key_reads_as_softmax(
        multilabel: tuple[onnx.ModelProto, Path], tmp_path: Path) -> None:
    """Bundles written before the key existed keep their behaviour: a softmax, even
    over a head whose Sigmoid the exporter removed."""
    model = onnx.load(str(multilabel[1]))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "onnxcam.head"]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    old = tmp_path / "old.cam.onnx"
    onnx.save(model, str(old))
    assert read_bundle(old).info.head == "softmax"
    result = Explainer(old, device="cpu").explain(pixels(2, 16))
    assert np.abs(result.probabilities - numpy_softmax(result.logits)).max() < CLOSE


def test_an_unknown_head_is_refused(multilabel: tuple[onnx.ModelProto, Path]) -> None:
    with pytest.raises(BundleError, match="claims head 'softplus', not one of softmax, "
                                          "sigmoid, none"):
        read_bundle(with_metadata(multilabel[1], head="softplus"))


def test_a_sigmoid_outside_the_graph_is_given_on_export(tmp_path: Path) -> None:
    source = models.onnx_multilabel(squash=False)
    out = tmp_path / "outside.cam.onnx"
    assert export(source, out, head="sigmoid").info.head == "sigmoid"
    images = pixels(3, 16)
    expected = numpy_sigmoid(run_source(source, images))
    result = Explainer(out, device="cpu").explain(images)
    assert np.abs(result.probabilities - expected).max() < CLOSE
    # Left to the graph, which ends in no squashing op: softmax, as always.
    assert export(source, tmp_path / "plain.cam.onnx").info.head == "softmax"


def test_a_head_that_contradicts_the_graph_or_is_unknown_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ends in Sigmoid, a sigmoid head; head 'softmax'"):
        export(models.onnx_multilabel(), tmp_path / "a.cam.onnx", head="softmax")
    with pytest.raises(ExportError, match="unknown head 'tanh'"):
        export(models.onnx_multilabel(), tmp_path / "b.cam.onnx", head="tanh")
    assert not list(tmp_path.iterdir())


def test_the_cli_takes_a_head_and_says_so(tmp_path: Path) -> None:
    source = tmp_path / "scores.onnx"
    onnx.save(models.onnx_multilabel(squash=False), str(source))
    runner = CliRunner()
    written = runner.invoke(main, ["export", str(source), "-o", str(tmp_path / "s.cam.onnx"),
                                   "--head", "sigmoid"])
    assert written.exit_code == 0, written.output
    assert written.output.rstrip().endswith("; preprocess unit; sigmoid head")
    assert metadata(tmp_path / "s.cam.onnx")["onnxcam.head"] == "sigmoid"
    plain = runner.invoke(main, ["export", str(source), "-o", str(tmp_path / "p.cam.onnx")])
    assert plain.exit_code == 0 and plain.output.rstrip().endswith("; preprocess unit")
    refused = runner.invoke(main, ["export", str(source), "-o", str(tmp_path / "x.onnx"),
                                   "--head", "tanh"])
    assert refused.exit_code != 0 and "'tanh' is not one of" in refused.output


# --------------------------------------------------------------------------- faithfulness


class Constant:
    """A predictor whose logits ignore the picture: every curve is flat at one
    probability, which is the AUC."""

    def __init__(self, logits: list[float]) -> None:
        self.logits = np.array(logits, np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.tile(self.logits, (len(batch), 1))


def test_faithfulness_curves_use_the_head() -> None:
    images = pixels(1, 8)
    heatmap = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    logits = [2.0, 1.0, -1.0]
    for head, expected in (("sigmoid", numpy_sigmoid(np.array(logits))[0]),
                           ("softmax", numpy_softmax(np.array([logits]))[0, 0])):
        deletion, insertion = deletion_insertion_auc(Constant(logits), images, heatmap, [0],
                                                     steps=4, head=head)
        assert deletion[0] == pytest.approx(expected, abs=1e-6)
        assert insertion[0] == pytest.approx(expected, abs=1e-6)


def test_the_audit_scores_a_sigmoid_head_by_its_sigmoid(
        multilabel: tuple[onnx.ModelProto, Path], tmp_path: Path) -> None:
    source, bundle = multilabel
    images = pixels(3, 16, seed=4)
    rows = []
    for n, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{n}.png")
        rows.append([str(tmp_path / f"{n}.png"), "", ""])
    with open(tmp_path / "manifest.csv", "w", newline="") as stream:
        csv.writer(stream).writerows([["image", "label", "bbox"], *rows])

    class Quiet:
        def advance(self, count: int = 1) -> None:
            pass

        def finish(self) -> None:
            pass

    run_audit(tmp_path / "manifest.csv", tmp_path / "out",
              LocalBackend(Explainer(bundle, device="cpu")), AuditOptions(),
              progress=Quiet())  # type: ignore[arg-type]
    with open(tmp_path / "out" / "results.csv", newline="") as stream:
        results = list(csv.DictReader(stream))
    expected = run_source(source, images)
    for row, want in zip(results, expected):
        assert row["status"] == "ok"
        assert row["pred"] == str(int(want.argmax()))
        assert float(row["score"]) == pytest.approx(float(want.max()), abs=1e-4)


# --------------------------------------------------------------------------- frameworks


@pytest.mark.slow
@pytest.mark.tf
def test_a_keras_sigmoid_head_gives_predicts_probabilities(tmp_path: Path) -> None:
    model = models.multilabel_sigmoid()
    out = tmp_path / "keras.cam.onnx"
    assert export(model, out).info.head == "sigmoid"
    assert metadata(out)["onnxcam.head"] == "sigmoid"
    images = pixels(4, 24, seed=2)
    expected = model.predict(images.astype(np.float32) / np.float32(255), verbose=0)
    result = Explainer(out, device="cpu").explain(images)
    error = float(np.abs(result.probabilities - expected).max())
    print(f"keras sigmoid head: max abs error {error:.2e}")  # noqa: T201 - for the figures
    assert error < CLOSE


def torch_net(head: Any) -> Any:
    """conv-ReLU-conv-ReLU, average pool, a 14-way linear head, then ``head``; weights
    drawn from a seeded generator, biases spread so the probabilities differ."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, FINDINGS), head)
    with torch.no_grad():
        net[6].bias.uniform_(-2.0, 2.0)
        net[6].weight.mul_(4.0)
    return net.eval()


@pytest.mark.torch
@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_a_torch_head_gives_forwards_probabilities(tmp_path: Path, head: str) -> None:
    torch = pytest.importorskip("torch")
    net = torch_net(torch.nn.Sigmoid() if head == "sigmoid" else torch.nn.Softmax(dim=1))
    out = tmp_path / "torch.cam.onnx"
    example = torch.zeros(1, 3, 16, 16)
    assert export(net, out, example=example, preprocess="unit").info.head == head
    images = pixels(4, 16, seed=3)
    with torch.no_grad():
        expected = net(torch.from_numpy(unit_nchw(images))).numpy()
    result = Explainer(out, device="cpu").explain(images)
    error = float(np.abs(result.probabilities - expected).max())
    print(f"torch {head} head: max abs error {error:.2e}")  # noqa: T201 - for the figures
    assert error < CLOSE
    if head == "sigmoid":
        assert not np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-2)

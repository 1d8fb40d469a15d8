"""Exporting a torch module from Python: its train/eval modes come back as they were,
the steps are reported through logging and ``on_stage``, and a head that ignores the
input (zero weights, as torchvision initialises ViT's) is called out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxcam
from onnxcam import Explainer
from onnxcam.errors import LayerNotFoundError

pytestmark = pytest.mark.torch

CLASSES = 4
SIZE = 16
# The steps of an export, in order, as ``export``'s docstring and the README name them.
STAGES = ["loading the model", "building the bundle", "verifying the bundle against the model",
          "writing the bundle"]


def small_net(zero_head: bool = False) -> Any:
    """conv-BN-ReLU-Dropout-conv-ReLU, average pool, linear head; every parameter
    tensor different. ``zero_head`` zeroes the head's weights (its bias stays)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    net = torch.nn.Sequential()
    net.add_module("features", torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU()))
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    net.add_module("head", torch.nn.Linear(8, CLASSES))
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
        net.head.bias.uniform_(-1.0, 1.0)
        if zero_head:
            net.head.weight.zero_()
    return net


def example() -> Any:
    torch = pytest.importorskip("torch")
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def modes(net: Any) -> dict[str, bool]:
    return {name: module.training for name, module in net.named_modules()}


# --------------------------------------------------------------------------- modes


def test_a_module_in_train_mode_comes_back_in_train_mode(tmp_path: Path) -> None:
    net = small_net().train()
    onnxcam.export(net, tmp_path / "net.cam.onnx", example=example(), layer="features.5")
    assert set(modes(net).values()) == {True}


def test_a_mix_of_train_and_eval_submodules_comes_back_the_same(tmp_path: Path) -> None:
    net = small_net().train()
    net.features[1].eval()  # frozen BatchNorm statistics, a common fine-tuning set-up
    net.head.eval()
    before = modes(net)
    assert len(set(before.values())) == 2
    onnxcam.export(net, tmp_path / "net.cam.onnx", example=example())
    assert modes(net) == before


def test_modes_come_back_when_the_export_fails(tmp_path: Path) -> None:
    net = small_net().train()
    net.features[1].eval()
    before = modes(net)
    with pytest.raises(LayerNotFoundError):
        onnxcam.export(net, tmp_path / "net.cam.onnx", example=example(), layer="no.such")
    assert modes(net) == before


def test_the_bundle_is_the_eval_mode_model(tmp_path: Path) -> None:
    """Exported in eval mode whatever the mode it came in: Dropout off, BatchNorm on its
    running statistics (torch in eval mode is the reference)."""
    torch = pytest.importorskip("torch")
    net = small_net().train()
    out = tmp_path / "net.cam.onnx"
    onnxcam.export(net, out, example=example(), preprocess="unit")
    images = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)
    got = Explainer(out, device="cpu").explain(images).logits
    reference = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).float())
    np.testing.assert_allclose(got, reference.detach().numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- progress


def test_the_steps_are_logged_and_told_from_python(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    told: list[str] = []
    with caplog.at_level(logging.INFO, logger="onnxcam.exporter"):
        onnxcam.export(small_net(), tmp_path / "net.cam.onnx", example=example(),
                       on_stage=told.append)
    assert told == STAGES
    logged = [record.getMessage() for record in caplog.records
              if record.name == "onnxcam.exporter.pipeline"
              and record.getMessage().startswith("export: ")]
    assert [message.split(" (")[0] for message in logged[:-1]] == \
        [f"export: {name}" for name in STAGES]
    assert logged[-1].startswith(f"export: wrote {tmp_path / 'net.cam.onnx'} in ")


# --------------------------------------------------------------------------- zero head


def test_a_zero_head_is_called_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = small_net(zero_head=True).eval()
    out = tmp_path / "zero.cam.onnx"
    with caplog.at_level(logging.WARNING, logger="onnxcam.exporter"):
        result = onnxcam.export(net, out, example=example(), layer="features.5")
    assert result.report is not None and result.report.constant_logits
    assert ("the logits do not depend on the input: every map will be empty; was the head "
            "initialised?") in caplog.messages
    # What the warning promises: the logits are the head's bias, the maps all zero.
    images = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)
    explained = Explainer(out, device="cpu").explain(images)
    bias = net.head.bias.detach().numpy()
    np.testing.assert_allclose(explained.logits, np.tile(bias, (3, 1)), rtol=1e-6)
    assert not np.any(explained.raw)


def test_a_live_head_is_not_called_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxcam.exporter"):
        result = onnxcam.export(small_net().eval(), tmp_path / "net.cam.onnx",
                                example=example())
    assert result.report is not None and not result.report.constant_logits
    assert not any("do not depend on the input" in message for message in caplog.messages)

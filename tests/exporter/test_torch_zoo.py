"""torchvision's zoo, exported as users export it, against pytorch-grad-cam (issue 10).

Every family's smallest member, perturbed so that no two tensors are equal, exported
with torch's default (dynamo) call and with ``dynamo=False``, both at batch 1. onnxcam
must export it with verification on and analytic gradients, its Grad-CAM map must
match pytorch-grad-cam's at the usual layer, and its default layer must be that one.
Cases that fail today are strict xfails carrying the error they gave, so each fix
turns its case into an XPASS that fails the run until its mark is removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")

import zoo  # noqa: E402  (tests/zoo.py)

from onnxcam import export  # noqa: E402
from onnxcam.exporter import describe, list_layers  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


# Known failures, (model, exporter) -> the first line of the error the case gives
# (torch 2.14.1, torchvision 0.29.1), run as strict xfails: a fixed one shows as XPASS.
USUAL_FAILS: dict[tuple[str, str], str] = {}  # every family verifies and matches
DEFAULT_FAILS: dict[tuple[str, str], str] = {}  # every default is the usual layer


# Wall time, not a tolerance: each of these took 140 to 300 s (torch's export and the
# float64 verification of a full-depth transformer) on two cores shared with other jobs,
# against pytest's default limit of 300 s.
SLOW = {"swin_t", "swin_v2_t", "vit_b_16"}


def cases(fails: dict[tuple[str, str], str]) -> list[Any]:
    def marks(key: tuple[str, str]) -> list[Any]:
        slow = [pytest.mark.timeout(900)] if key[0] in SLOW else []
        if key in fails:
            return [*slow, pytest.mark.xfail(strict=True, reason=fails[key])]
        return slow

    return [pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks((name, exporter)))
            for name in zoo.ZOO for exporter in zoo.PLAIN_EXPORTERS]


class Zoo:
    """One torch export per model x exporter per session, and one model in memory.

    The model is rebuilt (deterministically) when the next one is asked for, since
    keeping vgg11, vit_b_16 and the wide ResNet alive together costs gigabytes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.exports: dict[tuple[str, str], tuple[Path, str]] = {}
        self.references: dict[str, zoo.Reference] = {}
        self._model: tuple[str, Any] | None = None

    def model(self, name: str) -> Any:
        if self._model is None or self._model[0] != name:
            self._model = None
            self._model = (name, zoo.ZOO[name].model())
        return self._model[1]

    def export(self, name: str, exporter: str) -> tuple[Path, str]:
        """The ONNX file and the usual layer's tensor in it."""
        if (name, exporter) not in self.exports:
            entry = zoo.ZOO[name]
            model = self.model(name)
            path = zoo.export_torch(entry, model, exporter, self.folder / f"{name}-{exporter}.onnx")
            example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
            self.exports[name, exporter] = path, zoo.onnx_layer_name(path, model, entry.layer,
                                                                     example)
        return self.exports[name, exporter]

    def reference(self, name: str) -> zoo.Reference:
        """pytorch-grad-cam's raw maps at the usual layer (the same for every exporter)."""
        if name not in self.references:
            entry = zoo.ZOO[name]
            self.references[name] = zoo.reference(entry, self.model(name),
                                                  zoo.images(entry.size))
        return self.references[name]


@pytest.fixture(scope="session")
def torch_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("torch_zoo"))


def default_layer(path: Path) -> tuple[str, str]:
    """onnxcam's default layer: (node name, tensor), as ``onnxcam layers`` stars it."""
    layers = list_layers(path)
    starred = next(line for line in describe(layers) if line.startswith("*"))
    chosen = next(layer for layer in layers if layer.name == starred.split()[1])
    return chosen.name, chosen.tensor


@pytest.mark.parametrize(("name", "exporter"), cases(USUAL_FAILS))
def test_usual_layer_matches_pytorch_grad_cam(
    torch_zoo: Zoo, tmp_path: Path, name: str, exporter: str
) -> None:
    source, usual = torch_zoo.export(name, exporter)
    # "analytic" refuses at once where a rule is missing, rather than trying fd for minutes.
    result = export(source, tmp_path / "bundle.onnx", layer=usual, preprocess=zoo.PREPROCESS,
                    gradient="analytic", verify=True)
    assert result.info.gradient == "analytic"
    assert result.report is not None
    expected = torch_zoo.reference(name)
    # A map that is zero everywhere would match anything.
    assert ((expected.maps > 0).sum(axis=(1, 2)) >= 2).all(), "reference maps nearly empty"
    ours = zoo.onnxcam_maps(result.path, zoo.images(zoo.ZOO[name].size), expected.targets)
    assert ours.shape == expected.maps.shape, f"map grid {ours.shape} != {expected.maps.shape}"
    error = zoo.map_error(ours, expected.maps)
    assert error <= zoo.MAP_TOLERANCE, f"map error {error:.2e} against pytorch-grad-cam"


@pytest.mark.parametrize(("name", "exporter"), cases(DEFAULT_FAILS))
def test_default_layer_is_the_usual_one(torch_zoo: Zoo, name: str, exporter: str) -> None:
    source, usual = torch_zoo.export(name, exporter)
    if name in AFTER_USUAL:
        usual = reader_of(source, usual, AFTER_USUAL[name])
    chosen = default_layer(source)
    assert usual in chosen, \
        f"onnxcam's default layer is {chosen[0]}; the usual is {zoo.ZOO[name].layer} ({usual})"


# DenseNet's classifier pools F.relu(norm5), an in-place ReLU after the usual module:
# the default is that ReLU, the map the classifier reads (pytorch-grad-cam's hook on
# norm5 sees its activations after the in-place ReLU, its gradients before).
AFTER_USUAL = {"densenet121": "Relu"}


def reader_of(source: Path, tensor: str, op: str) -> str:
    """The tensor of the ``op`` layer that reads ``tensor``."""
    layers = list_layers(source)
    names = {layer.tensor: layer.name for layer in layers}
    return next(layer.tensor for layer in layers
                if layer.op == op and layer.source == names[tensor])


# --------------------------------------------------------------------------- the harness


def test_map_error_sees_another_class(torch_zoo: Zoo, tmp_path: Path) -> None:
    """The map comparison can fail: the same layer explained for other classes is far off."""
    source, usual = torch_zoo.export("resnet18", "legacy")
    bundle = tmp_path / "bundle.onnx"
    export(source, bundle, layer=usual, preprocess=zoo.PREPROCESS)
    expected = torch_zoo.reference("resnet18")
    others = tuple((k + 1) % zoo.CLASSES for k in expected.targets)
    ours = zoo.onnxcam_maps(bundle, zoo.images(zoo.ZOO["resnet18"].size), others)
    assert zoo.map_error(ours, expected.maps) > 50 * zoo.MAP_TOLERANCE


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "convnext_tiny"])
def test_perturbed_tensors_are_all_different(name: str) -> None:
    """As in trained weights: no two parameters or buffers hold the same values."""
    model = zoo.ZOO[name].model()
    seen: dict[bytes, str] = {}
    for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        key = tensor.detach().numpy().tobytes() + str(tuple(tensor.shape)).encode()
        assert key not in seen, f"{tensor_name} equals {seen.get(key)}"
        seen[key] = tensor_name


def test_layer_names_follow_both_exporters(torch_zoo: Zoo) -> None:
    """The usual layer's tensor is the one each exporter made for that module."""
    assert torch_zoo.export("resnet18", "dynamo")[1] == "relu_16"
    assert torch_zoo.export("resnet18", "legacy")[1] == "/layer4/layer4.1/relu_1/Relu_output_0"


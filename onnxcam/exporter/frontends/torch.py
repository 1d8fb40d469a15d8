"""The torch frontend: a ``torch.nn.Module`` in memory, exported to ONNX here.

The module goes through torch's TorchScript exporter (``dynamo=False``) with a
dynamic batch axis. That exporter traces any module that runs in eager mode
(the dynamo exporter refuses data-dependent control flow and needs
``dynamic_shapes`` spelled per model), and it names each node after the module
path that made it (``/layer4/layer4.1/relu_1/Relu``), so layers can be asked for
as users know them: ``layer4.1``, ``features.7``. The ONNX file then takes the
ONNX frontend's road. torchvision's detectors are exported as their users export
them, one image in a list (``torchvision_detectors``). torch is imported here only,
and only when this module is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcam.errors import LayerNotFoundError, UnsupportedModelError
from onnxcam.exporter.frontends import SourceModel, Tap
from onnxcam.exporter.module_paths import inside, legacy_scope
from onnxcam.exporter.shapes import run_with_outputs

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
MATCH_TOLERANCE = 1e-4  # relative: the module's hooked output against an ONNX tensor


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise UnsupportedModelError(
            "torch modules need the torch extra: pip install 'onnxcam[torch]'") from exc
    return torch


def output_names(module: Any, example: Any) -> list[str]:
    """Names for the module's outputs on ``example``: ``output`` for a tensor,
    ``output.0``, ``output.1``, ... for a tuple or list, the keys for a dict (the
    exporter writes a dict's values in its order)."""
    torch = _import_torch()
    with torch.no_grad():
        result = module(example)
    if isinstance(result, dict):
        return [str(key) for key in result]
    if isinstance(result, (tuple, list)) and len(result) > 1:
        return [f"{OUTPUT_NAME}.{index}" for index in range(len(result))]
    return [OUTPUT_NAME]


def to_onnx(module: Any, example: Any, opset: int = 17,
            outputs: Sequence[str] = (OUTPUT_NAME,)) -> onnx.ModelProto:
    """``module`` exported with a dynamic batch on ``example`` (an NCHW float tensor),
    its outputs called ``outputs``.

    Precondition: ``module`` is in eval mode; ``example`` is a 4-D float tensor.
    """
    batch_axes = {name: {0: "N"} for name in (INPUT_NAME, *outputs)}
    return exported(module, (example,), input_names=[INPUT_NAME], output_names=list(outputs),
                    dynamic_axes=batch_axes, opset_version=opset)


def exported(module: Any, args: tuple[Any, ...], **options: Any) -> onnx.ModelProto:
    """``torch.onnx.export(module, args, dynamo=False, **options)``, read back."""
    torch = _import_torch()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        # The exporter warns about tracing at length; none of it concerns the result.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, args, str(path), dynamo=False, **options)
            except Exception as exc:
                raise UnsupportedModelError(f"torch.onnx.export failed: {exc}") from exc
        return onnx.load(str(path))


def is_torchvision_detector(module: Any) -> bool:
    """Whether ``module`` is one of torchvision's detectors (Faster R-CNN, RetinaNet,
    FCOS, SSD), which take a list of [C, H, W] images and resize them themselves."""
    return type(getattr(module, "transform", None)).__name__ == "GeneralizedRCNNTransform"


def module_outputs(module: Any, paths: Sequence[str], example: Any) -> dict[str, np.ndarray]:
    """What each submodule at ``paths`` returns on ``example`` (forward hooks)."""
    torch = _import_torch()
    seen: dict[str, np.ndarray] = {}
    handles = []
    for path in paths:
        try:
            submodule = module.get_submodule(path)
        except AttributeError:
            names = [name for name, _ in module.named_modules() if name]
            raise LayerNotFoundError(path, names) from None

        def hook(_module: Any, _inputs: Any, output: Any, path: str = path) -> None:
            if isinstance(output, torch.Tensor):
                seen[path] = output.detach().cpu().numpy().copy()

        handles.append(submodule.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _in_scope(node: onnx.NodeProto, path: str) -> bool:
    """Whether the TorchScript exporter says ``node`` was made inside module ``path``
    (its name's folders: ``/layer3/layer3.0/downsample/downsample.0/Conv``)."""
    return inside(legacy_scope(node.name), path)


def tensors_for(model: onnx.ModelProto, module: Any, paths: Sequence[str],
                example: Any) -> dict[str, str]:
    """The ONNX tensor holding each module path's output.

    Found by value (the hooked output against every float tensor onnxruntime
    computes at batch 1), since the exporter keeps module paths on nodes, not on
    tensors; among equal tensors (Identity, in-place ops) the last one made inside
    the module wins.
    """
    wanted = module_outputs(module, paths, example)
    produced = [(node, name) for node in model.graph.node for name in node.output[:1]
                if name and node.op_type not in ("Constant", "Shape")]
    values = run_with_outputs(model, [name for _, name in produced],
                              {INPUT_NAME: example.detach().cpu().numpy()})
    found = {}
    for path in paths:
        if path not in wanted:
            raise UnsupportedModelError(f"module {path!r} does not return one tensor")
        target = wanted[path]
        scale = max(float(np.abs(target).max(initial=0.0)), 1e-12)
        matches = [(node, name) for node, name in produced
                   if values[name].shape == target.shape and values[name].dtype.kind == "f"
                   and float(np.abs(values[name] - target).max()) <= MATCH_TOLERANCE * scale]
        if not matches:
            raise UnsupportedModelError(f"no tensor in the exported graph holds the output "
                                        f"of module {path!r}")
        inside = [match for match in matches if _in_scope(match[0], path)]
        found[path] = (inside or matches)[-1][1]
    return found


@contextlib.contextmanager
def evaluating(module: Any) -> Iterator[Any]:
    """``module`` in eval mode for the block, then each submodule's own ``training``
    flag back as it was, a mix of train and eval included, also when the block fails:
    the caller may be exporting in the middle of training."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            # One by one: ``train(mode)`` would set every child to the parent's mode.
            submodule.training = training


def load(module: Any, example: Any, layer: str | Sequence[str] | None = None,
         opset: int = 17, logits: str | None = None) -> SourceModel:
    """A torch module as a source model; ``layer`` names module paths (``layer4.1``),
    ``logits`` the output holding the class scores (``output_names``).

    Precondition: ``example`` is a float tensor [1 or more, C, H, W] the module
    accepts; its spatial size becomes the bundle's. The module is exported in eval
    mode and left in the modes it came in.
    """
    torch = _import_torch()
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise UnsupportedModelError(
            "a torch module needs example=, an NCHW float tensor such as "
            "torch.randn(1, 3, 224, 224)")
    with evaluating(module):
        return _load_evaluating(module, example.detach().float(), layer, opset, logits)


def _load_evaluating(module: Any, example: Any, layer: str | Sequence[str] | None,
                     opset: int, logits: str | None) -> SourceModel:
    from onnxcam.exporter.frontends import onnx as onnx_frontend

    if is_torchvision_detector(module):
        # Exported as its users export it: one [C, H, W] image in a list, the legacy
        # exporter (torch's dynamo exporter fails inside its batched NMS); the ONNX
        # frontend finds its layers by module path itself.
        model = exported(module, ([example[0]],), opset_version=max(opset, 17))
        source = onnx_frontend.load(model, layer, None, None, opset, logits)
        source.source_format = "torch"
        return source
    model = to_onnx(module, example, max(opset, 17), output_names(module, example))
    paths = [layer] if isinstance(layer, str) else list(layer or [])
    by_path = tensors_for(model, module, paths, example) if paths else {}
    source = onnx_frontend.load(model, [by_path[p] for p in paths] or None, "nchw", None, opset,
                                logits)
    source.source_format = "torch"
    if not paths:
        return source
    names = {by_path[p]: p for p in paths}
    source.layer = paths[0]
    source.more_layers = [Tap(names.get(tap.tensor, tap.layer), tap.tensor, tap.layout)
                          for tap in source.more_layers]
    source.layers = [dataclasses.replace(info, name=names[info.tensor])
                     if info.tensor in names else info for info in source.layers]
    return source

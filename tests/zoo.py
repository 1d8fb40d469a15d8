"""torchvision's classification zoo as users export it, and pytorch-grad-cam's maps for it.

Shared by ``tests/exporter/test_torch_zoo.py`` and ``bench/torch_zoo.py`` (issue 10): one
entry per family (its smallest member), with every parameter and buffer perturbed
so that no two tensors are equal, as in trained weights; the usual pytorch-grad-cam
target layer and its ``reshape_transform``; the three ways the ONNX file is made;
the layer's name in that file; and both maps, onnxcam's and pytorch-grad-cam's, at
layer resolution. torch, torchvision and pytorch-grad-cam are imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10  # a light head; the head's shape is not what the zoo is about
IMAGES = 2
# BatchNorm's statistics are taken over this many values per channel of the coarsest
# (stride-32) map: at 64 pixels that map is 2x2, and the 4 images once used gave 16
# values, statistics that fit those images alone and blew others' activations up.
CALIBRATION_SAMPLES = 128
MAP_TOLERANCE = 2e-3  # issue 10: max |difference| of the min-max normalised maps
PREPROCESS = "torch"  # the bundle's own (x / 255 - mean) / std, replicated for torch below
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float64)

# How users make the ONNX file. "dynamo": torch 2.x's default call; "legacy": the
# TorchScript exporter; both at batch 1 with nothing dynamic. "dynamic" (legacy with a
# dynamic batch) is the way that already works, kept as a control.
EXPORTERS = ("dynamo", "legacy", "dynamic")
PLAIN_EXPORTERS = ("dynamo", "legacy")


@dataclass(frozen=True)
class ZooModel:
    """One torchvision family: how to build its smallest member and where to explain it."""

    name: str
    build: Callable[[], Any]  # -> torch.nn.Module (untrained, unperturbed)
    size: int  # square input side: the smallest that gives the layer a grid over 1x1
    layer: str  # the usual target module, as a path ``model.get_submodule`` reads
    reshape: str = ""  # "" (NCHW maps), "vit" (drop the class token), "swin" (NHWC), "tokens"

    def model(self, seed: int = 0) -> Any:
        """The model, every tensor perturbed and then its BatchNorm calibrated, in eval mode.

        In that order, as in training: statistics taken before the weights move no
        longer normalise what those weights compute, and the mismatch compounds over
        the depth (EfficientNet-B0's logits reached 8e3, V2-S's 2e5, with float32 and
        float64 runs of the same net 4e-4 and 0.6 apart).
        """
        import torch

        torch.manual_seed(seed)  # torchvision's initialisation draws from the global RNG
        model = perturb(self.build(), seed)
        return calibrate(model, self.size).eval()

    def reshape_transform(self) -> Callable[[Any], Any] | None:
        return RESHAPES[self.reshape] if self.reshape else None


def _tv(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kwargs)

    return build


# Layers follow pytorch-grad-cam's README and tutorials (the last stage's output);
# where it lists none (alexnet, maxvit, regnet, mnasnet, shufflenet) the same rule.
# inception_v3 needs 107 for a grid over 1x1 at that layer; maxvit_t's windows need
# 224 (every stage divisible by 7); alexnet and vgg11 need 224 for the legacy exporter,
# which exports AdaptiveAvgPool only when the pooled size (6, 7) divides the map's.
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("alexnet", _tv("alexnet"), 224, "features.12"),
    ZooModel("convnext_tiny", _tv("convnext_tiny"), 64, "features.7"),
    ZooModel("densenet121", _tv("densenet121"), 64, "features.norm5"),
    ZooModel("efficientnet_b0", _tv("efficientnet_b0"), 64, "features.8"),
    ZooModel("efficientnet_v2_s", _tv("efficientnet_v2_s"), 64, "features.7"),
    ZooModel("googlenet", _tv("googlenet", aux_logits=False, init_weights=False), 64,
             "inception5b"),
    ZooModel("inception_v3", _tv("inception_v3", aux_logits=False, init_weights=False), 107,
             "Mixed_7c"),
    ZooModel("maxvit_t", _tv("maxvit_t"), 224, "blocks.3"),
    ZooModel("mnasnet0_5", _tv("mnasnet0_5"), 64, "layers.16"),
    ZooModel("mobilenet_v2", _tv("mobilenet_v2"), 64, "features.18"),
    ZooModel("mobilenet_v3_small", _tv("mobilenet_v3_small"), 64, "features.12"),
    ZooModel("regnet_x_400mf", _tv("regnet_x_400mf"), 64, "trunk_output.block4"),
    ZooModel("resnet18", _tv("resnet18"), 64, "layer4.1"),
    ZooModel("resnext50_32x4d", _tv("resnext50_32x4d"), 64, "layer4.2"),
    ZooModel("shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), 64, "conv5"),
    ZooModel("squeezenet1_0", _tv("squeezenet1_0"), 64, "features.12"),
    ZooModel("swin_t", _tv("swin_t"), 64, "features.7.1.norm1", "swin"),
    ZooModel("swin_v2_t", _tv("swin_v2_t"), 64, "features.7.1.norm1", "swin"),
    ZooModel("vgg11", _tv("vgg11"), 224, "features.20"),
    ZooModel("vit_b_16", _tv("vit_b_16", image_size=64), 64, "encoder.layers.encoder_layer_11.ln_1",
             "vit"),
    ZooModel("wide_resnet50_2", _tv("wide_resnet50_2"), 64, "layer4.2"),
)}


# --------------------------------------------------------------------------- weights


def calibrate(model: Any, size: int, seed: int = 1) -> Any:
    """Set BatchNorm's running statistics from a few images, as training would.

    With the fresh statistics (mean 0, variance 1) the activations of a random network
    drift until the output no longer depends on the input (MobileNetV2 gives every
    image the same logits), and every Grad-CAM map is then the same flat one.

    Half the images are smooth, half white noise. A trained net's statistics come from
    photos, which have edges and texture; from smooth images alone the channels of
    random high-frequency filters get a tiny variance, and noise images (which
    onnxcam's verification probes with) then reach logits of 3e4 in EfficientNet-B0,
    where float32 and float64 runs of the same net differ by 2e-2.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
    model.eval()  # dropout and stochastic depth off: they would skew the statistics
    for norm in norms:
        norm.train()
    coarsest = max(size // 32, 1) ** 2
    half = max(-(-CALIBRATION_SAMPLES // coarsest) // 2, 4)
    noise = np.random.default_rng(seed).integers(0, 256, (half, size, size, 3), np.uint8)
    with torch.no_grad():
        model(torch_input(np.concatenate([images(size, half, seed=seed), noise])))
    return model.eval()


def perturb(model: Any, seed: int = 0) -> Any:
    """Add seeded noise to every float parameter and buffer, in place; returns ``model``.

    Fresh models have many equal tensors (BatchNorm's ones and zeros, zero biases),
    which the legacy exporter then shares through Identity nodes; trained weights have
    none. Each tensor moves by 10% of its own scale (so LayerScale's 1e-6 stays small);
    running variances are scaled instead, so they stay positive, and running means
    move by 10% of their channel's standard deviation.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *buffers.items()]:
            if not tensor.is_floating_point() or not tensor.numel():
                continue  # num_batches_tracked, relative-position indices
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if name.endswith("running_var"):
                tensor.mul_(torch.exp(0.1 * noise))
            elif name.endswith("running_mean"):
                # By a tenth of the channel's spread: relative to the mean itself, a
                # large mean over a small variance would blow the output up.
                spread = buffers[name.removesuffix("mean") + "var"].sqrt()
                tensor.add_(0.1 * spread * noise)
            else:
                tensor.add_(0.1 * max(float(tensor.abs().mean()), 1e-2) * noise)
    return model


# --------------------------------------------------------------------------- images


def images(size: int, count: int = IMAGES, seed: int = 0) -> np.ndarray:
    """uint8 NHWC photos stand-ins: smooth seeded blobs (scikit-image is not installed).

    Smooth images give Grad-CAM a structured map; white noise would give a flat one.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(count, 6, 6, 3))
    rows = np.linspace(0, 5, size)
    low = np.floor(rows).astype(int).clip(0, 4)
    frac = rows - low
    along_h, along_w = frac[None, :, None, None], frac[None, None, :, None]
    # Separable bilinear upsampling of the coarse grid.
    up = coarse[:, low] * (1 - along_h) + coarse[:, low + 1] * along_h
    up = up[:, :, low] * (1 - along_w) + up[:, :, low + 1] * along_w
    noise = rng.normal(0, 8, size=up.shape)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


def torch_input(batch: np.ndarray) -> Any:
    """What a ``preprocess="torch"`` bundle feeds the model, as an NCHW torch tensor."""
    import torch

    scale = (1.0 / (255.0 * TORCH_STD)).astype(np.float32)
    offset = (-TORCH_MEAN / TORCH_STD).astype(np.float32)
    x = batch.astype(np.float32) * scale + offset
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------- exporting


def export_torch(entry: ZooModel, model: Any, exporter: str, path: Path) -> Path:
    """Write ``model`` to ``path`` the way ``exporter`` names; batch 1 example input."""
    import torch

    example = torch_input(images(entry.size, 1, seed=99))
    quiet = io.StringIO()
    # The dynamo exporter prints its progress and warns at length; none of it matters here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        if exporter == "dynamo":
            torch.onnx.export(model, (example,), str(path))
        elif exporter == "legacy":
            torch.onnx.export(model, (example,), str(path), dynamo=False)
        elif exporter == "dynamic":
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                              opset_version=17)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    return path


def module_output(model: Any, layer: str, x: Any) -> np.ndarray:
    """The value the module at ``layer`` returns on ``x`` (a forward hook's view)."""
    import torch

    seen: list[np.ndarray] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _module, _inputs, output: seen.append(output.detach().numpy().copy()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


def _in_scope(node: Any, layer: str) -> bool:
    """Whether the exporter says ``node`` was made inside the module at ``layer``.

    dynamo lists the module paths in ``pkg.torch.onnx.name_scopes``. The legacy
    exporter writes a path into the node name, each part either a full path
    ("/features/features.7/features.7.1/norm1/LayerNormalization") or an attribute
    name ("/encoder/layers/encoder_layer_11/ln_1/...").
    """
    scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
    if f"'{layer}'" in scopes:
        return True
    path = ""
    for part in node.name.split("/")[1:-1]:
        path = part if "." in part or not path else f"{path}.{part}"
    return path == layer or path.startswith(layer + ".")


def onnx_layer_name(onnx_path: Path, model: Any, layer: str, x: Any) -> str:
    """The tensor in the ONNX file that holds the module's output.

    Found by value (the hooked output against every float tensor onnxruntime computes),
    since neither exporter keeps module names on tensors; when several tensors hold
    the same values (Identity, in-place ops), the last one made inside the module.
    """
    import onnx
    import onnxruntime as ort

    wanted = module_output(model, layer, x)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = proto.graph
    floats = {v.name for v in [*graph.value_info, *graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    produced = [(node, name) for node in graph.node for name in node.output if name in floats]
    have = {o.name for o in graph.output}
    for _node, name in produced:
        if name not in have:
            graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {session.get_inputs()[0].name: x.numpy()})))
    scale = max(float(np.abs(wanted).max()), 1e-12)
    matches = [(node, name) for node, name in produced
               if values[name].shape == wanted.shape
               and float(np.abs(values[name] - wanted).max()) <= 1e-4 * scale]
    if not matches:
        raise LookupError(f"no tensor in {onnx_path.name} holds the output of {layer}")
    inside = [match for match in matches if _in_scope(match[0], layer)]
    return (inside or matches)[-1][1]


# --------------------------------------------------------------------------- maps


def _vit_grid(tensor: Any) -> Any:
    """pytorch-grad-cam's ViT transform: drop the class token, tokens -> NCHW grid."""
    tokens = tensor[:, 1:, :]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _swin_grid(tensor: Any) -> Any:
    """Swin's blocks work channels-last [N, H, W, C]; pytorch-grad-cam wants NCHW."""
    return tensor.permute(0, 3, 1, 2)


def _token_grid(tensor: Any) -> Any:
    """Tokens [N, T, C] with no class token (LeViT, PVT, CaiT's patch blocks) on their
    square grid, NCHW."""
    side = int(round(tensor.shape[1] ** 0.5))
    return tensor.reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


RESHAPES: dict[str, Callable[[Any], Any]] = {"vit": _vit_grid, "swin": _swin_grid,
                                             "tokens": _token_grid}


def normalise(maps: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1], as pytorch-grad-cam's ``scale_cam_image`` does."""
    maps = np.asarray(maps, np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return (maps - low) / (high - low + 1e-7)


def raw_grad_cam(model: Any, layer: Any, x: Any, targets: Sequence[int],
                 reshape_transform: Any = None) -> np.ndarray:
    """pytorch-grad-cam's GradCAM at the module ``layer``: its cam after ReLU, at layer
    resolution, before the resizing ``compute_cam_per_layer`` then does."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class RawGradCAM(GradCAM):  # type: ignore[misc]
        raw: np.ndarray

        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(*args, **kwargs)
            self.raw = np.maximum(cam, 0)
            return cam

    with RawGradCAM(model=model, target_layers=[layer],
                    reshape_transform=reshape_transform) as cam:
        cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        return cam.raw


def reference_maps(entry: ZooModel, model: Any, batch: np.ndarray,
                   targets: tuple[int, ...]) -> np.ndarray:
    """pytorch-grad-cam's GradCAM at the usual layer: its cam after ReLU, before resizing."""
    grid = entry.reshape_transform()

    def copy(tensor: Any) -> Any:
        # pytorch-grad-cam keeps the hooked output itself; DenseNet's F.relu(inplace=True)
        # after norm5 then rewrites it, so its plain call pairs post-ReLU activations
        # with pre-ReLU gradients. A copy at hook time gives Grad-CAM at the layer.
        return (grid(tensor) if grid else tensor).clone()

    return raw_grad_cam(model, model.get_submodule(entry.layer), torch_input(batch), targets,
                        copy)


@dataclass(frozen=True)
class Reference:
    """pytorch-grad-cam's maps [N, h, w] and the class each image was explained for."""

    targets: tuple[int, ...]
    maps: np.ndarray


def reference(entry: ZooModel, model: Any, batch: np.ndarray) -> Reference:
    """pytorch-grad-cam's maps, each image explained for its most telling class."""
    targets = telling_targets(entry, model, batch)
    return Reference(targets, reference_maps(entry, model, batch, targets))


def telling_targets(entry: ZooModel, model: Any, batch: np.ndarray) -> tuple[int, ...]:
    """Per image, the class whose Grad-CAM map has the most positive cells, then spread.

    With untrained weights many classes give a map that is negative everywhere, zero
    after the ReLU, which any map would match. One forward pass and a head-only
    backward pass per class find better ones; the maps compared come from
    pytorch-grad-cam, called once for the chosen classes.
    """
    import torch

    grid = entry.reshape_transform() or (lambda tensor: tensor)
    seen: list[Any] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> Any:
        seen.append(output)
        return output.clone()  # in-place ops after the layer (DenseNet) leave ``output`` be

    handle = model.get_submodule(entry.layer).register_forward_hook(keep)
    try:
        logits = model(torch_input(batch))
    finally:
        handle.remove()
    activations = grid(seen[-1]).detach()
    maps = []
    for k in range(logits.shape[1]):
        (gradients,) = torch.autograd.grad(logits[:, k].sum(), seen[-1], retain_graph=True)
        weights = grid(gradients).mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((weights * activations).sum(dim=1)).numpy())
    every = np.stack(maps, axis=1)  # [N, K, h, w]
    positive = (every > 0).sum(axis=(2, 3))
    spread = np.stack([normalise(every[:, k]).std(axis=(1, 2)) for k in range(len(maps))], 1)
    return tuple(int(k) for k in np.argmax(positive + spread, axis=1))  # spread < 1: ties


def onnxcam_maps(bundle: Path, batch: np.ndarray, targets: tuple[int, ...]) -> np.ndarray:
    """onnxcam's Grad-CAM at the bundle's layer, on the CPU: the map after ReLU, unresized."""
    from onnxcam import Explainer

    explainer = Explainer(bundle, device="cpu")
    return explainer.explain(batch, list(targets), method="gradcam").raw


def map_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |difference| of the normalised maps; inf when the grids differ."""
    if ours.shape != reference.shape:
        return float("inf")
    error = float(np.abs(normalise(ours) - normalise(reference)).max())
    if os.environ.get("ONNXCAM_PRINT_ERRORS"):  # the figures for a closing note's table
        print(f"\nzoo map error: {error:.1e}")
    return error

"""A torchvision-shaped ResNet50 in plain torch, exported to ONNX for the benchmark.

The architecture (bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv) is written
out, so the benchmark needs torch but not torchvision; weights are random.
"""

from __future__ import annotations

from pathlib import Path


def resnet50():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int) -> None:
            super().__init__()
            width, out = planes, planes * 4
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != out:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                                nn.BatchNorm2d(out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + identity)

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if index == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def export_onnx(path: Path, size: int = 224) -> None:
    """The model to ``path``, and its weights beside it (``.pt``) for pytorch-grad-cam."""
    import torch

    torch.manual_seed(0)
    model = resnet50()
    torch.save(model.state_dict(), path.with_suffix(".pt"))
    example = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (example,), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                      opset_version=17, dynamo=False)

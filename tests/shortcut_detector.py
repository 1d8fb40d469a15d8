"""A detection set with a planted shortcut, and a tiny detector trained on it.

Scenes are 64x64 grey noise with one or two objects of three classes: bright squares
and diamonds, and discs barely above the noise. In training every disc has a bright
yellow patch just right of its box, and no other object has one: the patch is a far
easier cue than the disc itself, so the detector learns to find discs by it (the
detector's Clever Hans). It is trained in float64, so that every machine trains the
same one (float32 rounding, which differs with the CPU and the thread count, grows
over the steps into another detector with other maps). The detector
outputs ultralytics' raw head, ``[N, 4 + K, A]`` (cx, cy, w, h in input pixels, then
sigmoid class scores), exported by ``torch.onnx.export`` with ultralytics' metadata,
so it becomes a detection bundle like any YOLO export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZE = 64
LABELS = ("square", "disc", "diamond")
SHORTCUT = 1  # the disc
OBJECT = 16  # side of every object's box, in pixels
PATCH, GAP = 6, 0  # the tell-tale patch's side, and its distance from the disc's box
DISC_SHADE = (6, 10)  # the disc's contrast over the background noise (sd 4): barely there
STRIDES = (4, 8)
METADATA = {"author": "Ultralytics", "task": "detect", "end2end": "False",
            "names": repr(dict(enumerate(LABELS))), "args": "{'nms': None}"}


def shape_mask(cls: int) -> np.ndarray:
    """bool [OBJECT, OBJECT]: the class's silhouette inside its box."""
    centre = (np.arange(OBJECT) + 0.5) - OBJECT / 2
    y, x = np.meshgrid(centre, centre, indexing="ij")
    if cls == 0:
        return np.maximum(np.abs(x), np.abs(y)) < OBJECT / 2 - 1
    if cls == 1:
        return x**2 + y**2 < (OBJECT / 2 - 1) ** 2
    return np.abs(x) + np.abs(y) < OBJECT / 2


def scene(rng: np.random.Generator, patch_with: int | None = SHORTCUT,
          count: int | None = None) -> tuple[np.ndarray, list[tuple[int, tuple[int, ...]]]]:
    """One uint8 [SIZE, SIZE, 3] scene and its objects as (class, (x0, y0, x1, y1)).
    Objects of class ``patch_with`` get the yellow patch to their right."""
    image = rng.normal(30, 4, (SIZE, SIZE, 1)).repeat(3, axis=2)
    objects: list[tuple[int, tuple[int, ...]]] = []
    for _ in range(count or int(rng.integers(1, 3))):
        for _attempt in range(20):
            x0, y0 = (int(v) for v in rng.integers(1, SIZE - OBJECT - PATCH - GAP - 1, 2))
            box = (x0, y0, x0 + OBJECT, y0 + OBJECT)
            if all(box[0] >= other[2] + PATCH + GAP + 2 or other[0] >= box[2] + PATCH + GAP + 2
                   or box[1] >= other[3] + 2 or other[1] >= box[3] + 2 for _, other in objects):
                break
        else:
            continue
        cls = int(rng.integers(0, len(LABELS)))
        # The disc is faint, its patch bright: the patch is the easier cue.
        shade = rng.uniform(*DISC_SHADE) if cls == SHORTCUT else rng.uniform(80, 110)
        window = image[y0 : y0 + OBJECT, x0 : x0 + OBJECT]
        window[shape_mask(cls)] += shade
        if cls == patch_with:
            py = y0 + OBJECT // 2 - PATCH // 2
            image[py : py + PATCH, box[2] + GAP : box[2] + GAP + PATCH] = (255, 230, 0)
        objects.append((cls, box))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def scenes(count: int, seed: int, patch_with: int | None = SHORTCUT, objects: int | None = None
           ) -> tuple[np.ndarray, list[list[tuple[int, tuple[int, ...]]]]]:
    """``count`` scenes of ``objects`` objects each (None: one or two)."""
    rng = np.random.default_rng(seed)
    made = [scene(rng, patch_with, objects) for _ in range(count)]
    return np.stack([image for image, _ in made]), [objects for _, objects in made]


def write_coco(folder: Path, pixels: np.ndarray, objects: list[list[tuple[int, tuple[int, ...]]]],
               labels: tuple[str, ...] = LABELS) -> Path:
    """PNGs and a COCO instances JSON (boxes only, ``[x, y, w, h]``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, (image, found) in enumerate(zip(pixels, objects)):
        name = f"{index:03d}.png"
        Image.fromarray(image).save(folder / name)
        images.append({"id": index + 1, "file_name": name, "height": SIZE, "width": SIZE})
        for cls, (x0, y0, x1, y1) in found:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(labels)]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def build_detector() -> Any:
    """The torch module: three convs, then a Detect head on the stride-4 and stride-8
    maps (per level a box branch and a class branch, sigmoid scores), as ultralytics'
    module tree is named (``model.0`` ... ``model.3``)."""
    import torch
    from torch import nn

    def conv(cin: int, cout: int, kernel: int, stride: int, dilation: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2),
                                       dilation), nn.SiLU())

    class Detect(nn.Module):
        def __init__(self, channels: int, classes: int) -> None:
            super().__init__()
            self.cv2 = nn.ModuleList(nn.Sequential(conv(channels, 8, 3, 1),
                                                   nn.Conv2d(8, 4, 1)) for _ in STRIDES)
            self.cv3 = nn.ModuleList(nn.Sequential(conv(channels, 8, 3, 1),
                                                   nn.Conv2d(8, classes, 1)) for _ in STRIDES)
            grids, strides = [], []
            for stride in STRIDES:
                side = SIZE // stride
                ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
                grids.append(torch.stack([xs, ys]).reshape(2, -1).float() + 0.5)
                strides.append(torch.full((1, side * side), float(stride)))
            self.register_buffer("grid", torch.cat(grids, 1))
            self.register_buffer("stride", torch.cat(strides, 1))

        def forward(self, levels: list[Any]) -> Any:
            boxes = torch.cat([b(x).flatten(2) for b, x in zip(self.cv2, levels)], 2)
            logits = torch.cat([c(x).flatten(2) for c, x in zip(self.cv3, levels)], 2)
            centre = (self.grid + boxes[:, :2]) * self.stride
            size = torch.exp(boxes[:, 2:].clamp(-4, 4)) * self.stride
            return torch.cat([torch.cat([centre, size], 1), logits.sigmoid()], 1)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.ModuleList([conv(3, 8, 3, 2), conv(8, 16, 3, 2),
                                        conv(16, 16, 3, 1, dilation=2), conv(16, 16, 3, 2),
                                        Detect(16, len(LABELS))])

        def forward(self, x: Any) -> Any:
            p4 = self.model[2](self.model[1](self.model[0](x)))
            return self.model[4]([p4, self.model[3](p4)])

    return Tiny()


def targets(objects: list[list[tuple[int, tuple[int, ...]]]]) -> tuple[np.ndarray, ...]:
    """Per image and anchor: the class one-hot [N, K, A], the box target [N, 4, A] (the
    centre's offset from the cell's centre, log size, both over the stride) and where
    it applies [N, A]. An object's class anchor is the cell holding its centre at each
    level; its box is learnt there and at the 8 cells around, so that their boxes
    agree and suppression removes them where they pass the score threshold too."""
    anchors = sum((SIZE // s) ** 2 for s in STRIDES)
    classes = np.zeros((len(objects), len(LABELS), anchors), np.float32)
    boxes = np.zeros((len(objects), 4, anchors), np.float32)
    positive = np.zeros((len(objects), anchors), bool)
    for image, found in enumerate(objects):
        for cls, (x0, y0, x1, y1) in found:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            start = 0
            for stride in STRIDES:
                side = SIZE // stride
                gx, gy = min(int(cx // stride), side - 1), min(int(cy // stride), side - 1)
                classes[image, cls, start + gy * side + gx] = 1
                for ny in range(max(0, gy - 1), min(side, gy + 2)):
                    for nx in range(max(0, gx - 1), min(side, gx + 2)):
                        anchor = start + ny * side + nx
                        boxes[image, :, anchor] = (
                            cx / stride - nx - 0.5, cy / stride - ny - 0.5,
                            np.log((x1 - x0) / stride), np.log((y1 - y0) / stride))
                        positive[image, anchor] = True
                start += side * side
    return classes, boxes, positive


def train(pixels: np.ndarray, objects: list[list[tuple[int, tuple[int, ...]]]],
          steps: int = 400, seed: int = 0, lr: float = 1e-2, positive_weight: float = 10) -> Any:
    """The detector trained on ``pixels``: BCE on the class scores (positives weighted
    up), L1 on the raw box outputs at the objects' anchors."""
    import torch

    torch.manual_seed(seed)
    # In float64: float32 rounding, which differs with the CPU and the thread count,
    # grows over the steps into another detector (with other maps) on another machine.
    model = build_detector().double()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255
    classes, boxes, positive = (torch.from_numpy(t).double() if t.dtype != bool
                                else torch.from_numpy(t) for t in targets(objects))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    detect = model.model[4]
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,), generator=generator)
        levels = model.model[2](model.model[1](model.model[0](x[batch])))
        levels = [levels, model.model[3](levels)]
        raw_boxes = torch.cat([b(v).flatten(2) for b, v in zip(detect.cv2, levels)], 2)
        logits = torch.cat([c(v).flatten(2) for c, v in zip(detect.cv3, levels)], 2)
        # Every class of an object's anchor weighs more: telling the classes apart there.
        weight = 1 + positive_weight * classes[batch].amax(1, keepdim=True)
        class_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, classes[batch], weight=weight)
        mask = positive[batch][:, None].expand_as(raw_boxes)
        box_loss = (raw_boxes - boxes[batch]).abs()[mask].mean()
        loss = class_loss + box_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.float().eval()


def export_onnx(model: Any, path: Path) -> Path:
    """``torch.onnx.export`` as ultralytics calls it (TorchScript exporter, dynamic
    batch), then ultralytics' metadata."""
    import onnx
    import torch

    torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), str(path), dynamo=False,
                      input_names=["images"], output_names=["output0"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    exported = onnx.load(str(path))
    for key, value in METADATA.items():
        exported.metadata_props.add(key=key, value=value)
    onnx.save(exported, str(path))
    return path

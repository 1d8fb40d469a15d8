"""Generate the shipped audit example: a classifier that learned the snow, not the bus.

A tiny synthetic data set of bus-like and car-like objects on snow, grass and night
backgrounds, where every training bus stands on snow (and cars stand anywhere); a
small Keras CNN trained on it (``model.keras``, ``labels.txt``); its onnxcam bundle
(``model.onnx``); and test images
of both classes on all three backgrounds with their boxes (``manifest.csv``).

Needs the export extra (TensorFlow). Deterministic for a given TensorFlow build:

    python examples/shortcut/make_shortcut.py [--out examples/shortcut]
    onnxcam audit examples/shortcut/manifest.csv --model examples/shortcut/model.onnx \
        --out audit-out
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
LABELS = ("bus", "car")
BACKGROUNDS = ("snow", "grass", "night")
TRAIN_PER_CLASS = 600
TEST_PER_CASE = 10  # per (class, background)
# Half the training cars stand on snow, so the model must find cars by their shape; no
# training bus stands anywhere but on snow, so for buses the snow is all it needs. (With
# no car on snow, the model learns the backgrounds of both classes, cars' too.)
CAR_ON_SNOW = 0.5
CAR_GLASS = (90, 215, 235)
BODY_COLOURS = np.array([(205, 45, 40), (230, 190, 35), (235, 120, 30), (45, 85, 200),
                         (140, 60, 170), (200, 60, 130)], np.float32)


# -- drawing ---------------------------------------------------------------------------------


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """float32 [SIZE, SIZE, 3]: snow (bright, grey-blue), grass (green, streaky), night
    (dark blue with a few lights)."""
    if kind == "snow":
        base = np.array([228, 232, 240], np.float32) + rng.normal(0, 6, 3)
        image = base + rng.normal(0, 7, (SIZE, SIZE, 1))
        for _ in range(rng.integers(2, 5)):  # soft grey drifts
            cy, cx, r = rng.integers(0, SIZE, 2).tolist() + [int(rng.integers(6, 14))]
            yy, xx = np.ogrid[:SIZE, :SIZE]
            image -= 18 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
    elif kind == "grass":
        base = np.array([70, 140, 55], np.float32) + rng.normal(0, 8, 3)
        streaks = rng.normal(0, 6, (1, SIZE, 1)) + rng.normal(0, 6, (SIZE, SIZE, 1))
        image = base + streaks * np.array([0.5, 1.0, 0.4], np.float32)
    else:
        base = np.array([18, 24, 62], np.float32) + rng.normal(0, 4, 3)
        image = base + rng.normal(0, 4, (SIZE, SIZE, 1))
        for y, x in rng.integers(0, SIZE, (int(rng.integers(8, 16)), 2)):
            image[y, x] = (250, 235, 160)
    return np.broadcast_to(image, (SIZE, SIZE, 3)).astype(np.float32).copy()


def wheel(image: np.ndarray, cx: float, cy: float, radius: float) -> None:
    yy, xx = np.ogrid[:SIZE, :SIZE]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = (25, 25, 28)


def draw_bus(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A long box with a row of windows and two to four wheels, in many variants;
    returns its bbox."""
    width, height = int(rng.integers(40, 51)), int(rng.integers(9, 12))
    x0 = int(rng.integers(2, SIZE - width - 1))
    y0 = int(rng.integers(14, SIZE - height - 5))
    colour = BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
    image[y0 : y0 + height, x0 : x0 + width] = colour
    if rng.random() < 0.5:  # a stripe in a second colour
        image[y0 + height - 4 : y0 + height - 2, x0 : x0 + width] = \
            BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
    windows = int(rng.integers(3, 8)) if rng.random() < 0.3 else 0
    pitch = (width - 4) / max(windows, 1)
    glass = (40, 50, 70)
    for w in range(windows):
        wx = int(x0 + 3 + w * pitch)
        image[y0 + 2 : y0 + 6, wx : wx + int(pitch) - 2] = glass
    wheels = int(rng.integers(2, 4))
    for fraction in np.linspace(0.16, 0.84, wheels):
        wheel(image, x0 + fraction * width, y0 + height, 3.2)
    return x0, y0, x0 + width, min(SIZE, y0 + height + 4)


def draw_car(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A short body under a narrower cabin with two windows, two wheels; returns its bbox."""
    width, height = int(rng.integers(24, 31)), int(rng.integers(10, 14))
    cabin_width, cabin_height = int(width * 0.55), int(rng.integers(6, 8))
    x0 = int(rng.integers(2, SIZE - width - 1))
    y0 = int(rng.integers(14 + cabin_height, SIZE - height - 5))
    colour = BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
    cx0 = x0 + (width - cabin_width) // 2
    image[y0 - cabin_height : y0, cx0 : cx0 + cabin_width] = colour
    half = cabin_width // 2
    image[y0 - cabin_height + 2 : y0, cx0 + 2 : cx0 + half - 1] = CAR_GLASS
    image[y0 - cabin_height + 2 : y0, cx0 + half + 1 : cx0 + cabin_width - 2] = CAR_GLASS
    image[y0 : y0 + height, x0 : x0 + width] = colour
    image[y0 + 2 : y0 + 5, x0 + width - 3 : x0 + width] = (255, 225, 60)  # headlight
    for fraction in (0.22, 0.78):
        wheel(image, x0 + fraction * width, y0 + height, 3.2)
    return x0, y0 - cabin_height, x0 + width, min(SIZE, y0 + height + 4)


def scene(label: str, kind: str, rng: np.random.Generator
          ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    image = background(kind, rng)
    box = (draw_bus if label == "bus" else draw_car)(image, rng)
    image += rng.normal(0, 3, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), box


# -- training --------------------------------------------------------------------------------


def training_set(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every bus on snow; half the cars on snow, the others on grass or at night."""
    images, labels = [], []
    for index in range(TRAIN_PER_CLASS):
        images.append(scene("bus", "snow", rng)[0])
        labels.append(0)
        kind = "snow" if rng.random() < CAR_ON_SNOW else ("grass", "night")[index % 2]
        images.append(scene("car", kind, rng)[0])
        labels.append(1)
    return np.stack(images), np.array(labels)


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
        layers.Conv2D(48, 3, padding="same", activation="relu", name="last_conv"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(len(LABELS), activation="softmax"),
    ], name="shortcut_cnn")
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(images.astype(np.float32) / 255, labels, batch_size=32, epochs=20, shuffle=True,
              verbose=2)
    return model


# -- writing ---------------------------------------------------------------------------------


def write_tests(out: Path, rng: np.random.Generator) -> None:
    """PNG test images of both classes on every background, and manifest.csv."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    with open(out / "manifest.csv", "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["image", "label", "bbox"])
        for label in LABELS:
            for kind in BACKGROUNDS:
                for index in range(TEST_PER_CASE):
                    image, box = scene(label, kind, rng)
                    name = f"{label}_{kind}_{index:02d}.png"
                    Image.fromarray(image).save(folder / name, optimize=True)
                    writer.writerow([f"images/{name}", label, " ".join(map(str, box))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    out = parser.parse_args().out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from onnxcam.exporter import export

    rng = np.random.default_rng(2024)
    model = train(*training_set(rng))
    # The Keras model and its labels ship too: the README's quick start exports them.
    model.save(out / "model.keras")
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    export(out / "model.keras", out / "model.onnx", labels=list(LABELS), preprocess="unit")
    write_tests(out, np.random.default_rng(7))
    print(f"wrote {out / 'model.keras'}, {out / 'model.onnx'}, {out / 'manifest.csv'} and "
          f"{out / 'images'}")


if __name__ == "__main__":
    main()

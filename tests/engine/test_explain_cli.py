"""``onnxcam explain`` through click's CliRunner: files written, JSON lines, exit statuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import models
import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from onnxcam.cli import main
from onnxcam.engine import Explainer
from onnxcam.engine.images import load_image
from onnxcam.engine.maps import heatmaps, overlay
from onnxcam.exporter import export

LABELS = models.CNN_LABELS
SIZES = {"wide": (21, 40), "tall": (50, 19), "grey": (33, 33)}  # H, W; the bundle is 16x16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("explain_cli")


@pytest.fixture(scope="module")
def bundle(cnn_bundle: Path) -> Path:
    return cnn_bundle


@pytest.fixture(scope="module")
def explainer(bundle: Path) -> Explainer:
    return Explainer(bundle, device="cpu")


@pytest.fixture(scope="module")
def images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in SIZES.items():
        if name == "grey":
            path = folder / f"{name}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path, quality=95)
        else:
            path = folder / f"{name}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths[name] = path
    return paths


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def expected(explainer: Explainer, path: Path, method: str = "gradcam",
             target: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image at its own size, raw map, heatmap at the image's size) via the library."""
    image = load_image(path, explainer.info.channels)
    raw = explainer.explain([path], targets=target, method=method).raw[0]
    h, w = image.shape[:2]
    return image, raw, heatmaps(raw[None], h, w)[0]


def test_writes_heatmap_and_overlay_at_each_images_own_size(
    tmp_path: Path, bundle: Path, images: dict[str, Path], explainer: Explainer
) -> None:
    out = tmp_path / "out"
    result = run(bundle, *images.values(), "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}{suffix}" for p in images.values() for suffix in (".npy", ".png"))
    for name, path in images.items():
        h, w = SIZES[name]
        heat = np.load(out / f"{path.stem}.npy")
        assert heat.shape == (h, w) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1
        _, _, want = expected(explainer, path)
        np.testing.assert_allclose(heat, want, atol=1e-6)
        with Image.open(out / f"{path.stem}.png") as overlay:
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert overlay.size == (w, h)
    assert not list(out.glob(".*")), "temporary files left behind"


def test_raw_method_target_and_batch_size(
    tmp_path: Path, bundle: Path, images: dict[str, Path], explainer: Explainer
) -> None:
    paths = list(images.values())
    outputs = {}
    for size in ("1", "3"):
        out = tmp_path / f"out{size}"
        result = run(bundle, *paths, "--out", out, "--method", "layercam", "--target", "3",
                     "--raw", "--batch-size", size)
        assert result.exit_code == 0, result.output
        outputs[size] = out
        for path in paths:
            assert (out / f"{path.stem}.raw.npy").is_file()
            _, raw, heat = expected(explainer, path, "layercam", 3)
            got_raw = np.load(out / f"{path.stem}.raw.npy")
            assert got_raw.dtype == np.float32
            np.testing.assert_allclose(got_raw, raw, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(np.load(out / f"{path.stem}.npy"), heat, atol=1e-5)
    for path in paths:
        for suffix in (".npy", ".raw.npy"):
            np.testing.assert_allclose(np.load(outputs["1"] / f"{path.stem}{suffix}"),
                                       np.load(outputs["3"] / f"{path.stem}{suffix}"),
                                       rtol=1e-5, atol=1e-7)


def test_format_npy_writes_no_png(tmp_path: Path, bundle: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(bundle, images["wide"], "--out", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["wide.npy"]


def test_format_png_writes_no_npy(tmp_path: Path, bundle: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(bundle, images["wide"], "--out", out, "--format", "png")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["wide.png"]


def test_bad_format_is_a_usage_error(tmp_path: Path, bundle: Path,
                                     images: dict[str, Path]) -> None:
    result = run(bundle, images["wide"], "--out", tmp_path / "out", "--format", "jpg")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_json_prints_one_line_per_image(
    tmp_path: Path, bundle: Path, images: dict[str, Path], explainer: Explainer
) -> None:
    out = tmp_path / "out"
    result = run(bundle, *images.values(), "--out", out, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in lines(result.stdout)]
    assert len(records) == len(images)
    for record, path in zip(records, images.values()):
        assert set(record) == {"image", "target", "target_name", "logits", "top", "flat", "files"}
        assert record["flat"] is False
        assert record["image"] == str(path)
        want = explainer.explain([path])
        assert record["target"] == int(want.targets[0])
        np.testing.assert_allclose(record["logits"], want.logits[0], rtol=1e-5, atol=1e-6)
        assert len(record["top"]) == 5
        for entry in record["top"]:
            assert set(entry) == {"class", "label", "score"}
            assert entry["label"] == LABELS[entry["class"]]
        assert record["top"][0]["class"] == record["target"]
        assert sum(e["score"] for e in record["top"]) == pytest.approx(1.0, abs=1e-5)
        assert sorted(record["files"]) == sorted(
            str(out / f"{path.stem}{suffix}") for suffix in (".npy", ".png"))
        assert all(Path(f).is_file() for f in record["files"])


def test_json_with_target_and_raw(tmp_path: Path, bundle: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(bundle, images["tall"], "--out", out, "--json", "--target", "1", "--raw",
                 "--format", "npy")
    assert result.exit_code == 0, result.output
    (line,) = lines(result.stdout)
    record = json.loads(line)
    assert record["target"] == 1
    assert sorted(record["files"]) == [str(out / "tall.npy"), str(out / "tall.raw.npy")]


def test_one_bad_image_among_good_ones(
    tmp_path: Path, bundle: Path, images: dict[str, Path], explainer: Explainer
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    out = tmp_path / "out"
    paths = [images["wide"], bad, images["grey"]]
    result = run(bundle, *paths, "--out", out, "--json", "--batch-size", "2")
    assert result.exit_code == 2
    errors = lines(result.stderr)
    assert len(errors) == 1 and str(bad) in errors[0] and "error" in errors[0]
    for good in (images["wide"], images["grey"]):
        _, _, want = expected(explainer, good)
        np.testing.assert_allclose(np.load(out / f"{good.stem}.npy"), want, atol=1e-6)
        assert (out / f"{good.stem}.png").is_file()
    assert not list(out.glob("broken*"))
    records = [json.loads(line) for line in lines(result.stdout)]
    assert [r["image"] for r in records] == [str(p) for p in paths]
    assert records[1]["error"] == "bad_image" and str(bad) in records[1]["message"]
    assert "files" in records[0] and "files" in records[2]


def test_missing_image_exits_2(tmp_path: Path, bundle: Path, images: dict[str, Path]) -> None:
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    result = run(bundle, missing, images["tall"], "--out", out)
    assert result.exit_code == 2
    assert str(missing) in result.stderr
    assert (out / "tall.npy").is_file()


@pytest.mark.parametrize("method", ["gradcam+", "nope"])
def test_unknown_method_exits_2_with_one_line(tmp_path: Path, bundle: Path,
                                              images: dict[str, Path], method: str) -> None:
    out = tmp_path / "out"
    result = run(bundle, images["wide"], "--out", out, "--method", method)
    assert result.exit_code == 2
    errors = lines(result.stderr)
    assert len(errors) == 1 and repr(method) in errors[0] and "gradcam++" in errors[0]
    assert "Traceback" not in result.output
    assert not out.exists() or not list(out.iterdir())


def test_target_by_label_and_a_typo_with_a_suggestion(tmp_path: Path, bundle: Path,
                                                      images: dict[str, Path]) -> None:
    by_number = run(bundle, images["tall"], "--out", tmp_path / "n", "--json", "--target", "1")
    by_label = run(bundle, images["tall"], "--out", tmp_path / "l", "--json", "--target",
                   models.CNN_LABELS[1])
    assert by_label.exit_code == 0, by_label.output
    assert json.loads(by_label.stdout)["target"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "l" / "tall.npy"),
                                  np.load(tmp_path / "n" / "tall.npy"))
    assert by_number.exit_code == 0
    label = models.CNN_LABELS[1]
    typo = run(bundle, images["tall"], "--out", tmp_path / "t", "--target", label + "x")
    assert typo.exit_code == 2
    assert lines(typo.stderr) == [f"onnxcam: error: no class labelled '{label}x'; "
                                  f"did you mean '{label}'?"]


def test_target_out_of_range_exits_2(tmp_path: Path, bundle: Path,
                                     images: dict[str, Path]) -> None:
    result = run(bundle, images["wide"], "--out", tmp_path / "out", "--target", "7")
    assert result.exit_code == 2
    errors = lines(result.stderr)
    assert len(errors) == 1 and "7" in errors[0]


def test_not_a_bundle_exits_2(tmp_path: Path, images: dict[str, Path]) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_text("hello")
    result = run(fake, images["wide"], "--out", tmp_path / "out")
    assert result.exit_code == 2
    errors = lines(result.stderr)
    assert len(errors) == 1 and str(fake) in errors[0]


def test_same_stem_images_do_not_overwrite_each_other(tmp_path: Path, bundle: Path,
                                                      images: dict[str, Path]) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = other / images["wide"].name
    Image.open(images["tall"]).save(twin)
    out = tmp_path / "out"
    result = run(bundle, images["wide"], twin, "--out", out, "--format", "npy", "--json")
    assert result.exit_code == 0, result.output
    shapes = sorted(np.load(p).shape for p in out.glob("*.npy"))
    assert shapes == sorted([SIZES["wide"], SIZES["tall"]])


# --------------------------------------------------------------------------- gradient methods


@pytest.fixture(scope="module")
def gradient_bundle(folder: Path, cnn_source: Path) -> Path:
    out = folder / "cnn.gradients.onnx"
    export(cnn_source, out, layer=["last_relu", "relu1"], input_gradients=True, guided=True)
    return out


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "integrated-gradients",
                                    "guided-backprop", "guided-gradcam"])
def test_gradient_methods_write_maps_at_the_images_size(
    tmp_path: Path, gradient_bundle: Path, images: dict[str, Path], method: str
) -> None:
    out = tmp_path / "out"
    path = images["wide"]
    result = run(gradient_bundle, path, "--out", out, "--method", method, "--samples", "3",
                 "--noise", "0.1", "--steps", "4", "--seed", "5", "--raw")
    assert result.exit_code == 0, result.output
    explainer = Explainer(gradient_bundle, device="cpu")
    want = explainer.explain([path], method=method, samples=3, noise=0.1, steps=4, seed=5)
    raw = np.load(out / f"{path.stem}.raw.npy")
    assert raw.shape == (16, 16)  # the map at the bundle's input resolution
    np.testing.assert_allclose(raw, want.raw[0], rtol=1e-5, atol=1e-7)
    assert np.load(out / f"{path.stem}.npy").shape == SIZES["wide"]


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_eigen_smooth_flag(tmp_path: Path, gradient_bundle: Path, images: dict[str, Path],
                           method: str) -> None:
    out = tmp_path / "out"
    path = images["wide"]
    result = run(gradient_bundle, path, "--out", out, "--method", method, "--eigen-smooth",
                 "--raw")
    assert result.exit_code == 0, result.output
    explainer = Explainer(gradient_bundle, device="cpu")
    want = explainer.explain([path], method=method, eigen_smooth=True).raw[0]
    np.testing.assert_allclose(np.load(out / f"{path.stem}.raw.npy"), want, rtol=1e-5,
                               atol=1e-7)
    assert not np.allclose(want, explainer.explain([path], method=method).raw[0])
    refused = run(gradient_bundle, path, "--out", out, "--method", "saliency",
                  "--eigen-smooth")
    assert refused.exit_code != 0 and "eigen_smooth applies to the CAM methods" in \
        refused.output


def test_layers_strip(tmp_path: Path, gradient_bundle: Path, images: dict[str, Path]) -> None:
    from onnxcam.engine.images import resize
    from onnxcam.engine.maps import overlay
    from onnxcam.engine.outputs import (
        STRIP_GAP,
        STRIP_LABEL_HEIGHT,
        STRIP_MAX_HEIGHT,
        STRIP_MIN_HEIGHT,
    )

    out = tmp_path / "out"
    result = run(gradient_bundle, *images.values(), "--out", out, "--layers-strip")
    assert result.exit_code == 0, result.output
    explainer = Explainer(gradient_bundle, device="cpu")
    for name, path in images.items():
        h, w = SIZES[name]
        scale = min(max(1.0, STRIP_MIN_HEIGHT / h), STRIP_MAX_HEIGHT / h)
        ph, pw = round(h * scale), round(w * scale)
        with Image.open(out / f"{path.stem}.layers.png") as strip:
            assert strip.mode == "RGB"
            # three panels (the image, relu1, then last_relu), small images scaled up
            assert strip.size[1] > ph >= min(STRIP_MIN_HEIGHT, STRIP_MAX_HEIGHT)
            pixels = np.asarray(strip)
        picture = resize(load_image(path, 3), ph, pw)
        maps = explainer.explain([path]).layer_maps
        assert list(maps) == ["relu1", "last_relu"]
        cell = (strip.size[0] + STRIP_GAP) // 3 - STRIP_GAP
        panels = pixels[STRIP_LABEL_HEIGHT : STRIP_LABEL_HEIGHT + ph]  # the colour bar below
        for column, layer in ((1, "relu1"), (2, "last_relu")):
            left = column * (cell + STRIP_GAP) + (cell - pw) // 2
            expected = overlay(picture, heatmaps(maps[layer], ph, pw)[0])
            # the CLI ran all images as one batch: last-bit float differences, 1 level
            np.testing.assert_allclose(panels[:, left : left + pw], expected, atol=1)
        np.testing.assert_array_equal(panels[:, (cell - pw) // 2 : (cell - pw) // 2 + pw],
                                      picture)


def test_layers_strip_needs_a_method_with_layers(tmp_path: Path, gradient_bundle: Path,
                                                 images: dict[str, Path]) -> None:
    result = run(gradient_bundle, images["wide"], "--out", tmp_path, "--method", "saliency",
                 "--layers-strip")
    assert result.exit_code == 2
    assert "no map per layer" in result.stderr


def test_gradient_method_on_a_bundle_without_them(tmp_path: Path, bundle: Path,
                                                  images: dict[str, Path]) -> None:
    result = run(bundle, images["wide"], "--out", tmp_path, "--method", "guided-backprop")
    assert result.exit_code == 2
    assert "--guided" in result.stderr and result.stderr.count("\n") == 1


def test_explain_help_lists_the_new_options() -> None:
    result = CliRunner().invoke(main, ["explain", "--help"])
    for option in ("--samples", "--noise", "--steps", "--layers-strip", "saliency",
                   "guided-gradcam"):
        assert option in result.output


def test_alpha_and_colormap_shape_the_overlay(tmp_path: Path, bundle: Path,
                                              images: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = run(bundle, images["tall"], "--out", out, "--alpha", "0.3", "--colormap", "viridis")
    assert result.exit_code == 0, result.output
    picture = load_image(images["tall"])
    heatmap = np.load(out / "tall.npy")
    want = overlay(picture, heatmap, 0.3, "viridis")
    got = np.asarray(Image.open(out / "tall.png"))
    np.testing.assert_array_equal(got, want)
    bad = run(bundle, images["tall"], "--out", tmp_path / "bad", "--alpha", "2")
    assert bad.exit_code == 2 and "--alpha" in bad.output


def test_a_flat_map_is_captioned_in_its_overlay() -> None:
    """An all-zero map (no region raises the score) shows nothing: its overlay says so
    in a white band along the top, and an ordinary map's overlay has none."""
    from onnxcam.engine.outputs import FLAT_CAPTION, render

    image = np.full((40, 180, 3), 90, np.uint8)
    flat_files = render(image, np.zeros((4, 4), np.float32), ["png"], False)
    shown = np.asarray(Image.open(io.BytesIO(flat_files[".png"])))
    assert FLAT_CAPTION and (shown[0, :20] == 255).all()  # the band
    assert ((shown[1:13, :120] < 128).all(axis=-1)).any()  # dark text in it
    varied = np.arange(16, dtype=np.float32).reshape(4, 4)
    plain = np.asarray(Image.open(io.BytesIO(render(image, varied, ["png"], False)[".png"])))
    np.testing.assert_array_equal(plain, overlay(image, heatmaps(varied[None], 40, 180)[0]))


# -- several targets per image ---------------------------------------------------------------

MULTI_LABELS = ["a", "b", "c:x", "d", "e f", "g"]


@pytest.fixture(scope="module")
def multilabel_bundle(folder: Path) -> Path:
    out = folder / "skip.cam.onnx"
    export(models.onnx_skip_head(), out, layer="last_relu", head="sigmoid", labels=MULTI_LABELS)
    return out


def test_several_targets_write_a_map_per_target(tmp_path: Path, multilabel_bundle: Path,
                                                images: dict[str, Path]) -> None:
    """Each image gets <stem>.<target>.npy/.png per --target and --contrast, a JSON line
    each, the maps those of the API's rows (labels made file-safe: 'e f' -> e_f)."""
    result = run(multilabel_bundle, images["wide"], images["tall"], "--out", tmp_path,
                 "--target", "e f", "--target", "0", "--contrast", "c:x:a", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in lines(result.output)]
    assert [(Path(r["image"]).stem, r["target"], r["target_name"]) for r in records] == [
        (stem, cls, name) for stem in ("wide", "tall")
        for cls, name in ((4, "e f"), (0, "a"), (2, "c:x-vs-a"))]
    ex = Explainer(multilabel_bundle, device="cpu")
    from onnxcam import Contrast

    for name, image in (("wide", images["wide"]), ("tall", images["tall"])):
        picture = load_image(str(image), 3)
        want = ex.explain([picture], targets=[[4, 0, Contrast(2, 0)]])
        for row, part in enumerate(("e_f", "a", "c_x-vs-a")):
            got = np.load(tmp_path / f"{name}.{part}.npy")
            expected = heatmaps(want.raw[row][None], *picture.shape[:2])[0]
            np.testing.assert_allclose(got, expected, atol=1e-6)
            assert (tmp_path / f"{name}.{part}.png").exists()
    assert not (tmp_path / "wide.npy").exists()


def test_all_positive_and_an_image_with_none(tmp_path: Path, multilabel_bundle: Path,
                                             images: dict[str, Path]) -> None:
    """all-positive: one map per class over --threshold, best first; an image with none
    gets a record with no targets and no files, and the exit status stays 0."""
    ex = Explainer(multilabel_bundle, device="cpu")
    pictures = [load_image(str(images[n]), 3) for n in ("wide", "tall")]
    logits = ex.explain(pictures).logits
    chance = 1 / (1 + np.exp(-logits.astype(np.float64)))
    threshold = float(np.clip(chance[0].max() + 1e-4, 1e-3, 0.999))
    threshold = min(threshold, float(chance[1].max()) - 1e-6)
    assert chance[0].max() < threshold < chance[1].max()
    result = run(multilabel_bundle, images["wide"], images["tall"], "--out", tmp_path,
                 "--target", "all-positive", "--threshold", str(threshold), "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in lines(result.output)]
    assert records[0] == {"image": str(images["wide"]), "targets": [], "files": []}
    assert [r["target"] for r in records[1:]] == [
        int(c) for c in np.argsort(-logits[1]) if chance[1, c] > threshold]


def test_mask_is_for_segmentation_bundles(tmp_path: Path, multilabel_bundle: Path,
                                          images: dict[str, Path]) -> None:
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    result = run(multilabel_bundle, images["wide"], "--out", tmp_path, "--target", "a",
                 "--mask", mask)
    assert result.exit_code == 2 and "segmentation bundles" in result.output
    result = run(multilabel_bundle, images["wide"], "--out", tmp_path, "--mask", mask)
    assert result.exit_code == 2 and "--mask needs the --target" in result.output
    result = run(multilabel_bundle, images["wide"], "--out", tmp_path, "--contrast", "a:zz")
    assert result.exit_code == 2 and "two classes as A:B" in result.output

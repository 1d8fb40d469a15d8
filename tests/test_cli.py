"""The ``onnxcam`` command line: click's CliRunner, plus real runs of the console script.

Bad inputs must end with exit status 2, one line ``onnxcam: error: ...`` on stderr,
nothing on stdout and nothing left in the output folder (no bundle, no temp file).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

import onnxcam
import onnxcam.engine.explainer
import onnxcam.exporter.pipeline
from onnxcam.cli import main
from onnxcam.exporter.vjp import load_rules

# --------------------------------------------------------------------------- models


def _finish(nodes: list, inputs: list, output: str, classes: int, inits: list,
            name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    value = np.random.default_rng(seed).normal(0, 0.1, shape).astype(np.float32)
    return numpy_helper.from_array(value, name)


def mlp_rank4() -> onnx.ModelProto:
    """A rank-4 image input, but only Flatten -> Gemm -> Softmax: no spatial layer."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["z"], name="fc", transB=1),
        helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])]
    return _finish(nodes, inputs, "probs", 4, [_const("w", (4, 192)), _const("b", (4,))], "mlp")


def mlp_rank2() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["z"], name="fc", transB=1),
        helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=-1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 12])]
    return _finish(nodes, inputs, "probs", 4, [_const("w", (4, 12)), _const("b", (4,))], "rank2")


def two_inputs() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["left", "right"], ["sum"], name="add"),
        helper.make_node("Conv", ["sum", "k"], ["conv"], name="conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits_out"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8])
              for n in ("left", "right")]
    inits = [_const("k", (4, 3, 3, 3)), _const("w", (2, 4)), _const("b", (2,))]
    return _finish(nodes, inputs, "logits_out", 2, inits, "two_inputs")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_models")
    onnx.save(models.onnx_cnn(), str(folder / "cnn.onnx"))
    onnx.save(mlp_rank4(), str(folder / "mlp.onnx"))
    onnx.save(mlp_rank2(), str(folder / "rank2.onnx"))
    onnx.save(two_inputs(), str(folder / "two_inputs.onnx"))
    (folder / "garbage.onnx").write_bytes(b"this is not a protobuf \x00\xff\xfe" * 10)
    (folder / "model.pt").write_bytes(b"PK\x03\x04 torch zip")
    (folder / "labels3.txt").write_text("cat\ndog\nbird\n", encoding="utf-8")
    (folder / "labels5.txt").write_text("a\nb\nc\nd\ne\n", encoding="utf-8")
    return folder


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxcam: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def starred(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("*")]


# --------------------------------------------------------------------------- layers


def test_layers_marks_exactly_one_default(models_dir: Path) -> None:
    result = invoke("layers", models_dir / "cnn.onnx")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 5  # conv1 relu1 pool1 conv2 last_relu: the 4-D maps only
    (default,) = starred(lines)
    assert default.split()[1] == "last_relu"
    assert all(line.startswith(("* ", "  ")) for line in lines)
    names = [line[2:].split()[0] for line in lines]
    assert names == ["conv1", "relu1", "pool1", "conv2", "last_relu"]


def test_layers_dynamic_size_needs_input_size(tmp_path: Path) -> None:
    model = models.onnx_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((2, "H"), (3, "W")):
        dims[axis].Clear()
        dims[axis].dim_param = name
    src = tmp_path / "dynamic.onnx"
    onnx.save(model, str(src))
    assert_one_line_error(invoke("layers", src), "--input-size")
    result = invoke("layers", src, "--input-size", "24", "20")
    assert result.exit_code == 0, result.output
    (default,) = starred(result.stdout.splitlines())
    assert default.split()[-1] == "16x12x10"


@pytest.mark.tf
def test_layers_of_keras_model(mnist_path: Path) -> None:
    result = invoke("layers", mnist_path)
    assert result.exit_code == 0, result.output
    (default,) = starred(result.stdout.splitlines())
    assert default.split()[1] == "pool2"  # the map Flatten reads


@pytest.mark.tf
@pytest.mark.slow
def test_tensorflows_start_up_notices_are_not_shown(mnist_path: Path, console: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """TF 2.21 prints its oneDNN notice twice on import, whatever TF_CPP_MIN_LOG_LEVEL
    says; `onnxcam layers` shows it only with -v. (oneDNN is on by default only on
    CPUs with AVX-512 and the like: the test turns it on, so the notice comes anywhere.)"""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    quiet = run(console, "layers", mnist_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "pool2" in quiet.stdout
    assert "oneDNN" not in quiet.stderr and "InitializeLog" not in quiet.stderr
    assert "oneDNN custom operations are on" in run(console, "-v", "layers", mnist_path).stderr


# --------------------------------------------------------------------------- export


def test_export_writes_bundle(models_dir: Path, out_dir: Path) -> None:
    out = out_dir / "bundle.onnx"
    result = invoke("export", models_dir / "cnn.onnx", "-o", out, "--labels",
                    models_dir / "labels5.txt", "--preprocess", "torch")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"wrote {out}: layer last_relu, 5 classes, analytic gradients, "
                               "verified, worst relative error ")
    assert lines[0].endswith("; preprocess torch")  # the embedded preprocessing, stated
    assert result.stderr == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["bundle.onnx"]
    info = onnxcam.read_bundle_info(out)
    assert info.labels == ["a", "b", "c", "d", "e"]
    assert info.preprocess == "torch"


def test_export_options(models_dir: Path, out_dir: Path) -> None:
    out = out_dir / "nested" / "bundle.onnx"  # missing folders are created
    result = invoke("export", models_dir / "cnn.onnx", "--output", out, "--layer", "conv2",
                    "--gradient", "fd", "--no-verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("fd gradients, not verified; preprocess unit")
    info = onnxcam.read_bundle_info(out)
    assert (info.target_layer, info.gradient) == ("conv2", "fd")
    assert [p.name for p in out.parent.iterdir()] == ["bundle.onnx"]


def test_export_input_gradients_guided_and_several_layers(models_dir: Path,
                                                          out_dir: Path) -> None:
    out = out_dir / "gradients.onnx"
    result = invoke("export", models_dir / "cnn.onnx", "-o", out, "--layer", "last_relu",
                    "--layer", "relu1", "--input-gradients", "--guided")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        f"wrote {out}: layer last_relu (and relu1), 5 classes, analytic gradients, "
        "input_gradients, guided_input_gradients, verified")
    info = onnxcam.read_bundle_info(out)
    assert [(e.name, e.index) for e in info.layers] == [("relu1", 1), ("last_relu", 0)]
    assert info.input_gradients == ("input_gradients", "guided_input_gradients")


BAD_INPUTS = {
    # name: (arguments after the source, source file, words the message must contain)
    "missing": ([], "does_not_exist.onnx", ["does_not_exist.onnx"]),
    "garbage": ([], "garbage.onnx", ["garbage.onnx"]),
    "unsupported-type": ([], "model.pt", ["unsupported model type"]),
    "no-spatial-layer": ([], "mlp.onnx", ["4-D"]),
    "rank-2": ([], "rank2.onnx", ["rank 2"]),
    "two-inputs": ([], "two_inputs.onnx", ["2 inputs", "left", "right"]),
    "unknown-layer": (["--layer", "nope"], "cnn.onnx",
                      ["'nope'", "conv1", "relu1", "pool1", "conv2", "last_relu"]),
    "labels-length": (["--labels", "labels3.txt"], "cnn.onnx", ["3 labels", "5 classes"]),
    "labels-empty": (["--labels", "/dev/null"], "cnn.onnx", ["/dev/null", "no labels"]),
    "layer-typo": (["--layer", "last_rel"], "cnn.onnx", ["did you mean 'last_relu'"]),
    "fd-input-gradients": (["--gradient", "fd", "--input-gradients"], "cnn.onnx",
                           ["analytic", "--gradient fd"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_export_bad_input(models_dir: Path, out_dir: Path, case: str) -> None:
    extra, source, needles = BAD_INPUTS[case]
    extra = [str(models_dir / a) if a.endswith(".txt") else a for a in extra]
    result = invoke("export", models_dir / source, "-o", out_dir / "bundle.onnx", *extra)
    assert_one_line_error(result, *needles)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("source", ["garbage.onnx", "model.pt", "mlp.onnx", "rank2.onnx",
                                    "two_inputs.onnx", "does_not_exist.onnx"])
def test_layers_bad_input(models_dir: Path, source: str) -> None:
    assert_one_line_error(invoke("layers", models_dir / source))


@pytest.mark.tf
def test_export_garbage_keras_file(tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "broken.keras"
    src.write_bytes(b"not a zip archive at all")
    result = invoke("export", src, "-o", out_dir / "bundle.onnx")
    assert_one_line_error(result, "broken.keras")
    assert list(out_dir.iterdir()) == []


def test_verification_failure_leaves_no_file(
    models_dir: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real defect, at the default tolerances: Gemm's gradient rule returns twice the
    gradient, so every gradient and weight in the bundle doubles."""
    rules = load_rules()  # every rule module imported first, so none re-registers later
    gemm = rules["Gemm"]
    monkeypatch.setitem(rules, "Gemm", lambda ctx, node, grads: [
        None if g is None else ctx.b.op("Mul", [g, ctx.scalar(2.0)])
        for g in gemm(ctx, node, grads)])
    result = invoke("export", models_dir / "cnn.onnx", "-o", out_dir / "bundle.onnx")
    assert_one_line_error(result, "bundle disagrees with its source")
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- console script


@pytest.fixture(scope="module")
def console() -> str:
    path = shutil.which("onnxcam")
    if path is None:
        pytest.skip("the onnxcam console script is not installed")
    return path


def run(console: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([console, *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def test_console_script_layers_and_export(console: str, models_dir: Path,
                                          out_dir: Path) -> None:
    listed = run(console, "layers", models_dir / "cnn.onnx")
    assert listed.returncode == 0, listed.stderr
    (default,) = starred(listed.stdout.splitlines())
    assert "last_relu" in default

    out = out_dir / "bundle.onnx"
    exported = run(console, "export", models_dir / "cnn.onnx", "-o", out)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith(f"wrote {out}: layer last_relu")
    assert sorted(p.name for p in out_dir.iterdir()) == ["bundle.onnx"]


def test_console_script_error(console: str, models_dir: Path, out_dir: Path) -> None:
    failed = run(console, "export", models_dir / "two_inputs.onnx", "-o", out_dir / "b.onnx")
    assert failed.returncode == 2
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcam: error: "), failed.stderr
    assert failed.stdout == ""
    assert list(out_dir.iterdir()) == []


def test_console_script_version(console: str) -> None:
    shown = run(console, "--version")
    assert shown.returncode == 0
    assert onnxcam.__version__ in shown.stdout


def test_a_closed_stdout_ends_the_command_quietly(console: str, models_dir: Path) -> None:
    """`onnxcam layers m.onnx | head -1`, with the reader gone before the first line."""
    import os

    reader, writer = os.pipe()
    os.close(reader)  # every write to the pipe now fails with EPIPE
    try:
        listed = subprocess.run([console, "layers", str(models_dir / "cnn.onnx")],
                                stdout=writer, stderr=subprocess.PIPE, text=True,
                                timeout=300, check=False)
    finally:
        os.close(writer)
    assert listed.returncode == 141  # 128 + SIGPIPE, as a shell reports `yes | head -1`
    assert listed.stderr == ""  # no traceback, no "internal error", no "Exception ignored"


# --------------------------------------------------------------------------- public API


PUBLIC_API = [
    "BadImageError", "BadMethodError", "BadTargetError", "BundleError", "BundleInfo",
    "Contrast", "Explainer", "Explanation", "ExportError", "ExportResult", "JobError",
    "OnnxcamError", "Region", "Weighting", "__version__", "export", "heatmaps", "list_layers",
    "overlay", "read_bundle_info",
]


def test_public_api_is_pinned_sorted_and_importable() -> None:
    assert onnxcam.__all__ == sorted(onnxcam.__all__) == PUBLIC_API
    namespace: dict = {}
    exec("from onnxcam import *", namespace)
    assert set(PUBLIC_API) <= set(namespace)
    # Each name is the object its defining module holds, not a copy or a stub.
    assert onnxcam.Explainer is onnxcam.engine.explainer.Explainer
    assert onnxcam.export is onnxcam.exporter.pipeline.export
    assert issubclass(onnxcam.BadImageError, onnxcam.OnnxcamError)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        onnxcam.nothing  # noqa: B018

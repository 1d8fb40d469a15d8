"""``onnxcam explain`` on a machine whose onnxruntime offers CUDA but which has no GPU
(onnxruntime-gpu and torch's CUDA wheels installed, no driver): the device probe stays
quiet. A real process: onnxruntime's loader errors come from C++, at the fd level."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NOISE = ("libonnxruntime_providers_cuda", "CUDAExecutionProvider", "[E:onnxruntime",
         "[W:onnxruntime")
# No device files: no NVIDIA GPU is there, so CUDA cannot work whatever is installed.
NO_GPU = not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quiet_cuda") / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def explain(bundle: Path, image: Path, out: Path, *options: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxcam", "explain", str(bundle), str(image),
                           "--out", str(out), *options],
                          capture_output=True, text=True, timeout=120)


def test_explain_on_device_auto_is_quiet(cnn_bundle: Path, image: Path, tmp_path: Path) -> None:
    done = explain(cnn_bundle, image, tmp_path / "maps")
    assert done.returncode == 0, done.stderr
    assert not any(noise in done.stderr for noise in NOISE), done.stderr
    assert (tmp_path / "maps" / "image.npy").exists()


@pytest.mark.skipif(not NO_GPU, reason="this machine has an NVIDIA GPU")
def test_device_cuda_without_a_gpu_says_so_once(cnn_bundle: Path, image: Path,
                                                tmp_path: Path) -> None:
    done = explain(cnn_bundle, image, tmp_path / "maps", "--device", "cuda")
    assert done.returncode == 0, done.stderr
    assert not any(noise in done.stderr for noise in NOISE), done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("onnxcam: ")]
    assert said == ["onnxcam: CUDA was asked for but is not usable here; running on the CPU"]

"""The bundle reader trusts nothing a bundle says: weights stored outside the file,
metadata out of bounds or at odds with the graph are refused before any session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hostile_bundles import reading_outside, with_metadata

from onnxcam.bundle import read_bundle
from onnxcam.engine import Explainer
from onnxcam.errors import BundleError


def test_weights_read_from_outside_the_file_are_refused(cnn_bundle: Path,
                                                       tmp_path: Path) -> None:
    data, length = reading_outside(cnn_bundle, "credentials")
    secret = (bytes(range(1, 256)) * (length // 255 + 1))[:length]
    (tmp_path / "credentials").write_bytes(secret)
    bundle = tmp_path / "bundle.onnx"
    bundle.write_bytes(data)
    # The attack is real: onnxruntime alone loads the file's bytes as the weight, and
    # they come back in the logits.
    session = ort.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])
    assert session.get_inputs()
    for source in (bundle, data):
        with pytest.raises(BundleError, match="outside its file \\(at 'credentials'\\)"):
            read_bundle(source)
        with pytest.raises(BundleError, match="outside its file"):
            Explainer(source, device="cpu")


@pytest.mark.parametrize(("changes", "refusal"), [
    ({"batch_size": "100000000"}, "batch size 100000000, outside \\[0, 4096\\]"),
    ({"input_height": "16000", "input_width": "16000"}, "input height 16000"),
    ({"input_channels": "0"}, "input channels 0"),
    ({"num_classes": "2000000000"}, "number of classes 2000000000"),
    ({"num_classes": "3"}, "5 labels for 3 classes"),
    ({"input_height": "32"}, "image input's axis 1 is 16, but the metadata says 32"),
    ({"batch_size": "4"}, "image input's axis 0 is None, but the metadata says 4"),
])
def test_metadata_is_held_to_bounds_and_to_the_graph(cnn_bundle: Path, changes: dict,
                                                     refusal: str) -> None:
    data = with_metadata(cnn_bundle, **changes)
    with pytest.raises(BundleError, match=refusal):
        read_bundle(data)


def test_a_good_bundle_still_reads(cnn_bundle: Path) -> None:
    bundle = read_bundle(cnn_bundle)
    assert (bundle.info.height, bundle.info.width, bundle.info.batch_size) == (16, 16, 0)
    maps = Explainer(cnn_bundle, device="cpu").explain(
        [np.full((16, 16, 3), 90, np.uint8)]).heatmaps
    assert np.isfinite(maps).all() and os.path.exists(cnn_bundle)

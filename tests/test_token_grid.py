"""The token-layer part of the bundle contract: ``TokenGrid`` and its metadata keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxcam.bundle import KEY_ACTIVATION_GRID, KEY_LAYERS, BundleInfo, LayerEntry
from onnxcam.errors import BundleError
from onnxcam.layout import Layout, TokenGrid


def info(**changes: object) -> BundleInfo:
    base: dict[str, object] = dict(
        height=32, width=32, channels=3, preprocess="torch", layout="nchw",
        activation_layout="nchw", target_layer="ln_1", num_classes=5, labels=[],
        gradient="analytic")
    base.update(changes)
    return BundleInfo(**base)  # type: ignore[arg-type]


def test_grid_drops_the_leading_tokens_and_lays_out_rows() -> None:
    grid = TokenGrid(leading=2, height=2, width=3)
    tokens = np.arange(2 * 8 * 4, dtype=np.float32).reshape(2, 8, 4)  # [N, 2 + 6, C]
    maps = grid.to_nchw(tokens)
    assert maps.shape == (2, 4, 2, 3)
    # cell (i, j) is token 2 + 3 i + j, channel c on axis 1: a hand-written reshape
    for n in range(2):
        for i in range(2):
            for j in range(3):
                np.testing.assert_array_equal(maps[n, :, i, j], tokens[n, 2 + 3 * i + j])
    assert grid.tokens == 8 and str(grid) == "ntc"


def test_token_bundle_metadata_round_trips() -> None:
    grid = TokenGrid(1, 4, 4)
    written = info(activation_layout="ntc", activation_grid=grid).to_metadata()
    assert json.loads(written[KEY_ACTIVATION_GRID]) == {"leading_tokens": 1, "height": 4,
                                                       "width": 4}
    read = BundleInfo.from_metadata(written)
    assert read.activation_grid == grid
    assert read.layers[0].activation_layout == grid
    assert read.extra == {}


def test_older_bundles_read_the_same() -> None:
    written = info().to_metadata()
    assert KEY_ACTIVATION_GRID not in written
    read = BundleInfo.from_metadata(written)
    assert read.activation_grid is None
    assert read.layers[0].activation_layout is Layout.NCHW
    entry = LayerEntry("conv", 0, "nhwc")
    assert "grid" not in entry.to_json()


def test_several_layers_carry_their_grids() -> None:
    entries = (LayerEntry("ln_1", 1, "ntc", TokenGrid(1, 4, 4)), LayerEntry("ln_2", 0, "ntc",
                                                                             TokenGrid(1, 4, 4)))
    written = info(activation_layout="ntc", activation_grid=TokenGrid(1, 4, 4),
                   all_layers=entries).to_metadata()
    listed = json.loads(written[KEY_LAYERS])
    assert [e["grid"] for e in listed] == [{"leading_tokens": 1, "height": 4, "width": 4}] * 2
    assert BundleInfo.from_metadata(written).all_layers == entries


def test_a_token_layer_without_its_grid_is_refused() -> None:
    written = info(activation_layout="ntc").to_metadata()
    with pytest.raises(BundleError, match="without its grid"):
        BundleInfo.from_metadata(written)

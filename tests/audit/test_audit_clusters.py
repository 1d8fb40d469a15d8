"""Strategy clusters against hand-worked spectra, an independent dense computation and
scikit-learn, on tiny inputs; and the sample's bound on memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from onnxcam.audit.clusters import (
    GRID,
    MINORITY_NOTE,
    cluster_classes,
    cluster_maps,
    downsize,
    knn_affinity,
)
from onnxcam.audit.results import ResultsWriter
from onnxcam.engine.outputs import npy_bytes


def flat_maps(maps: list[np.ndarray]) -> np.ndarray:
    return np.array([m.ravel() / m.sum() for m in maps])


def reference_laplacian_eigenvalues(points: np.ndarray, neighbours: int) -> np.ndarray:
    """Dense float64 reference written out loop by loop: kNN graph (ties to the lower
    index), symmetrised by 'or', normalised Laplacian, all eigenvalues."""
    n = len(points)
    weights = np.zeros((n, n))
    for i in range(n):
        others = sorted((float(np.sum((points[i] - points[j]) ** 2)), j)
                        for j in range(n) if j != i)
        for _, j in others[:neighbours]:
            weights[i, j] = weights[j, i] = 1.0
    degree = weights.sum(axis=1)
    laplacian = np.eye(n) - weights / np.sqrt(np.outer(degree, degree))
    return np.linalg.eigvalsh(laplacian)


def two_groups() -> np.ndarray:
    """Four 4x4 maps with their mass top-left, four with it bottom-right."""
    rng = np.random.default_rng(0)
    maps = []
    for corner in (0, 2, 0, 2, 0, 2, 0, 2):
        m = np.full((4, 4), 0.01) + 0.01 * rng.random((4, 4))
        m[corner:corner + 2, corner:corner + 2] += 1.0
        maps.append(m)
    return flat_maps(maps)


def test_two_obvious_groups_give_two_clusters_with_the_hand_worked_eigengap() -> None:
    points = two_groups()
    found = cluster_maps("x", 8, np.arange(8), points)
    # 8 maps: ceil(sqrt(8)) = 3 neighbours, so each map is joined to the 3 others of its
    # group: two disjoint K4. Each K4's normalised Laplacian I - A/3 has eigenvalues
    # 0 and 1 + 1/3 (three times), so the spectrum is 0, 0, 4/3 x 6 and the gap 4/3.
    assert found.eigenvalues == pytest.approx([0, 0] + [4 / 3] * 6, abs=1e-9)
    assert found.eigenvalues == pytest.approx(reference_laplacian_eigenvalues(points, 3),
                                              abs=1e-9)
    assert (found.k, found.eigengap) == (2, pytest.approx(4 / 3))
    # Cluster 0 is the one holding row 0 (equal sizes: ties go to the earliest row).
    assert found.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert found.to_json()["sizes"] == [4, 4]


def test_one_tight_group_gives_one_cluster() -> None:
    rng = np.random.default_rng(3)
    base = np.zeros((4, 4))
    base[1:3, 1:3] = 1.0
    points = flat_maps([base + 0.05 * rng.random((4, 4)) for _ in range(16)])
    found = cluster_maps("x", 16, np.arange(16), points)
    reference = reference_laplacian_eigenvalues(points, 4)
    assert found.eigenvalues == pytest.approx(reference, abs=1e-9)
    gaps = np.diff(reference[:9])
    assert int(np.argmax(gaps)) == 0 and found.k == 1
    assert found.eigengap == pytest.approx(reference[1])
    assert found.to_json()["minority"] is None


def three_groups(seed: int = 0, sizes: tuple[int, ...] = (40, 25, 15),
                 noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps, truth = [], []
    for group, size in enumerate(sizes):
        for _ in range(size):
            m = np.full((GRID, GRID), 0.05) + noise * rng.random((GRID, GRID))
            m[group * 3:group * 3 + 2, group * 3:group * 3 + 2] += 1.0
            maps.append(m)
            truth.append(group)
    return flat_maps(maps), np.array(truth)


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # the groups are apart
def test_spectral_labels_agree_with_scikit_learn() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    neighbors = pytest.importorskip("sklearn.neighbors")
    points, truth = three_groups()
    found = cluster_maps("x", len(points), np.arange(len(points)), points)
    assert found.k == 3
    # The affinity is scikit-learn's kNN graph, symmetrised by 'or'.
    connectivity = neighbors.kneighbors_graph(points, 9, include_self=False).toarray()
    assert np.array_equal(knn_affinity(points, 9), np.maximum(connectivity, connectivity.T))
    theirs = sklearn_cluster.SpectralClustering(
        3, affinity="precomputed", random_state=0, assign_labels="kmeans").fit_predict(
        np.maximum(connectivity, connectivity.T))
    assert metrics.adjusted_rand_score(theirs, found.labels) == 1.0
    assert metrics.adjusted_rand_score(truth, found.labels) == 1.0


def test_a_small_tight_far_cluster_is_a_minority_strategy() -> None:
    points, truth = three_groups(sizes=(60, 12), noise=0.3)
    found = cluster_maps("x", len(points), np.arange(len(points)), points)
    data = found.to_json()
    assert (found.k, data["sizes"], data["note"]) == (2, [60, 12], MINORITY_NOTE)
    minority = data["minority"]
    inside, rest = points[truth == 1], points[truth == 0]
    spread = np.mean([np.linalg.norm(p - inside.mean(axis=0)) for p in inside])
    rest_spread = np.mean([np.linalg.norm(p - rest.mean(axis=0)) for p in rest])
    separation = np.linalg.norm(inside.mean(axis=0) - rest.mean(axis=0))
    assert (minority["cluster"], minority["size"], minority["share"]) == (1, 12, 0.1667)
    assert minority["spread"] == pytest.approx(spread, abs=1e-5)
    assert minority["rest_spread"] == pytest.approx(rest_spread, abs=1e-5)
    assert minority["separation"] == pytest.approx(separation, abs=1e-5)


def test_equal_halves_are_no_minority() -> None:
    points, _ = three_groups(sizes=(30, 30))
    found = cluster_maps("x", len(points), np.arange(len(points)), points)
    assert found.k == 2 and found.to_json()["minority"] is None


def test_downsize_is_an_area_average_with_unit_mass() -> None:
    raw = np.zeros((16, 16), np.float16)
    raw[:2, :2] = 4.0  # the top-left cell of the 8x8 grid, nothing else
    raw[15, 15] = 2.0  # half of the bottom-right cell's 2x2 block... a quarter of it
    small = downsize(raw)
    expected = np.zeros((GRID, GRID))
    expected[0, 0], expected[-1, -1] = 1.0, 0.125  # min-max: 1 and 0.5; cells average 2x2
    assert small == pytest.approx(expected / expected.sum(), abs=1e-7)
    assert downsize(np.ones((7, 7), np.float16)).sum() == 0  # a flat map shows nothing


def write_results(out: Path, rows: int, maps: int = 50, flat: int = 0) -> Path:
    """results.csv of ``rows`` rows of one class, cycling over ``maps`` stored 16x16 maps,
    the first ``flat`` of them constant."""
    rng = np.random.default_rng(0)
    (out / "heatmaps").mkdir(parents=True)
    for index in range(maps):
        raw = np.full((16, 16), 0.5) if index < flat else rng.random((16, 16))
        (out / "heatmaps" / f"{index}.npy").write_bytes(npy_bytes(raw.astype(np.float16)))
    path = out / "results.csv"
    writer = ResultsWriter(path)
    writer.write({"image": f"{index}.png", "label": "a", "pred": "a", "status": "ok",
                  "explained": "a", "heatmap": f"heatmaps/{index % maps}.npy"}
                 for index in range(rows))
    writer.close()
    return path


def peak_bytes(out: Path, rows: int, sample: int) -> int:
    path = write_results(out, rows)
    tracemalloc.start()
    found = cluster_classes(path, out, sample)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (found["a"].rows, len(found["a"].indices)) == (rows, sample)
    return peak


def test_the_sample_bounds_memory(tmp_path: Path) -> None:
    small = peak_bytes(tmp_path / "small", 1_000, 200)
    large = peak_bytes(tmp_path / "large", 20_000, 200)
    assert large < 1.1 * small, (small, large)


def test_the_sample_is_spread_over_the_class_and_stated(tmp_path: Path) -> None:
    from onnxcam.audit.clusters import clusters_json

    path = write_results(tmp_path, 3_000)
    found = cluster_classes(path, tmp_path, 100)
    indices = found["a"].indices
    assert len(set(indices.tolist())) == 100
    # A uniform sample of 0..2999: each third holds about a third of it.
    assert all(20 <= ((indices >= low) & (indices < low + 1000)).sum() <= 47
               for low in (0, 1000, 2000))
    data = json.loads(json.dumps(clusters_json(found, 100)))
    assert (data["sample"], data["per_class"]["a"]["rows"],
            data["per_class"]["a"]["sampled"]) == (100, 3_000, 100)


def test_empty_maps_are_counted_and_left_out(tmp_path: Path) -> None:
    path = write_results(tmp_path, 40, maps=40, flat=6)
    found = cluster_classes(path, tmp_path, 1000)["a"]
    assert found.indices.tolist() == list(range(6, 40))
    assert (found.to_json()["sampled"], found.to_json()["empty"]) == (40, 6)
    only_empty = write_results(tmp_path / "flat", 5, maps=5, flat=5)
    data = cluster_classes(only_empty, tmp_path / "flat", 1000)["a"].to_json()
    assert (data["sampled"], data["empty"], data["k"], data["clusters"]) == (5, 5, 0, [])


def test_the_cli_states_the_sample_and_can_turn_clusters_off(
        tmp_path: Path, image_folder: Path, audit_bundle: Path) -> None:
    from click.testing import CliRunner
    from conftest import manifest_rows, write_manifest

    from onnxcam.cli import main

    manifest = write_manifest(tmp_path / "m.csv", manifest_rows(image_folder, 30))

    def audit(out: str, sample: str) -> tuple[int, dict]:
        result = CliRunner().invoke(main, ["audit", str(manifest), "--model", str(audit_bundle),
                                           "--out", str(tmp_path / out),
                                           "--clusters-sample", sample])
        path = tmp_path / out / "summary.json"
        return result.exit_code, json.loads(path.read_text()) if path.exists() else {}

    code, summary = audit("five", "5")
    assert code == 0 and summary["clusters"]["sample"] == 5
    # 30 rows over 5 classes: 6 explained per class, 5 of them sampled.
    assert {(c["rows"], c["sampled"]) for c in summary["clusters"]["per_class"].values()} \
        == {(6, 5)}
    assert "at most 5 rows" in (tmp_path / "five" / "report.html").read_text()
    code, summary = audit("off", "0")
    assert code == 0 and "clusters" not in summary
    assert audit("two", "2")[0] == 2


def test_a_loose_cluster_is_no_minority_however_far() -> None:
    """On 4x4 one-hot maps: 20 rows all on cell 0, and 5 rows of a cluster one each on
    cells 3, 5, 10, 12, 15. The cluster's mean is 0.2 on those cells, so its spread is
    sqrt(0.8^2 + 4 * 0.2^2) = 0.894 and its separation from the rest sqrt(5 * 0.2^2 +
    1) = 1.095: more than half of it, so not tight. All five on cell 15 is tight."""
    from onnxcam.audit.clusters import ClassClusters

    def clusters(cells: list[int]) -> ClassClusters:
        maps = np.zeros((25, 16))
        maps[np.arange(25), [0] * 20 + cells] = 1.0
        labels = np.array([0] * 20 + [1] * 5)
        return ClassClusters("x", 25, np.arange(25), maps, labels, np.zeros(25), 2, 0.5,
                             np.zeros((25, 2)))

    assert clusters([3, 5, 10, 12, 15]).minority() is None
    tight = clusters([15] * 5).minority()
    assert tight is not None
    assert (tight["spread"], tight["separation"], tight["rest_spread"]) == (
        0.0, pytest.approx(np.sqrt(2), abs=1e-5), 0.0)

"""Strategy clusters per class (SpRAy: Lapuschkin et al., "Unmasking Clever Hans
predictors", Nature Communications 2019), with no boxes needed.

Each explained class's heatmaps (a bounded random sample of them) are downsized to a
GRID x GRID grid and normalised to unit mass; a symmetrised k-nearest-neighbour graph
joins similar maps, and spectral clustering on its normalised Laplacian groups them,
the number of groups chosen by the largest eigengap. It reads results.csv and the
stored raw maps after the run, so local, distributed and resumed audits cluster alike.

Plain numpy (a dense ``eigh`` on at most ``sample`` x ``sample``, and a small k-means)
rather than scikit-learn, which would bring scipy, joblib and threadpoolctl to a slim
install that has none of them; the tests hold the result to scikit-learn's.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from onnxcam.audit.results import ResultRow, read_heatmap, read_results
from onnxcam.engine.maps import normalize
from onnxcam.errors import OnnxcamError

if TYPE_CHECKING:
    from onnxcam.audit.summary import Thresholds

log = logging.getLogger(__name__)

SAMPLE = 1000  # rows per class clustered at most (--clusters-sample)
GRID = 8  # downsized heatmaps are GRID x GRID
# Each map is joined to its min(NEIGHBOURS, ceil(sqrt(S))) nearest in a sample of S:
# a fixed 10 would join every map to every other in a class of 11 rows.
NEIGHBOURS = 10
MAX_CLUSTERS = 8
MEMBERS = 50  # member row indices listed per cluster in summary.json
EXEMPLARS = 4  # rows shown per cluster: those nearest its mean map
SEED = 0
# A minority strategy: a cluster of at most MINORITY_SHARE of the sample (and at least
# MINORITY_MIN rows), tight and far from the rest of the class (see minority()).
MINORITY_SHARE = 0.35
MINORITY_MIN = 3
TIGHT = 0.5
MINORITY_NOTE = "a minority strategy: look here"
# A cluster explained by the background: of a class with several clusters, not all of
# them so, with at least MINORITY_MIN rows with a box, its mean energy-in-box below the
# flag threshold and either below the lift threshold times its box area (no better than
# a uniform map) or at most FAR_BELOW times the mean of the class's other rows with a box.
FAR_BELOW = 0.5
BACKGROUND_NOTE = "these {count} images are explained by the background"


def downsize(raw: np.ndarray) -> np.ndarray:
    """A raw map as a GRID x GRID distribution of its mass: min-max normalised (as the
    metrics see it), area-averaged onto the grid, divided by its sum. A flat map (no
    evidence anywhere) stays all zeros."""
    scaled = normalize(raw[None].astype(np.float32))[0]
    small = np.asarray(Image.fromarray(scaled, mode="F")
                       .resize((GRID, GRID), Image.Resampling.BOX), dtype=np.float64)
    total = small.sum()
    return small / total if total > 0 else small


class Sampled(NamedTuple):
    """What the sample keeps of a row: where its map is, and the figures its cluster's
    means are taken over (nan where the row has no box or no label)."""

    row: int  # index in results.csv
    heatmap: str
    energy_in_box: float
    box_area: float
    correct: float


NAN = float("nan")


def sampled(index: int, row: ResultRow) -> Sampled:
    def number(name: str) -> float:
        return float(row[name]) if row.get(name) else NAN

    return Sampled(index, row["heatmap"], number("energy_in_box"), number("box_area"),
                   number("correct"))


class Reservoir:
    """A uniform random sample of at most ``size`` items of a stream (Algorithm R)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.seen = 0
        self.items: list[Sampled] = []

    def offer(self, item: Sampled) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = item


def sample_rows(results: Path, size: int, classes: list[str] | None,
                seed: int = SEED) -> dict[str, Reservoir]:
    """Per explained class, a sample of its ok rows: index, heatmap reference and
    three numbers each. Only these are held, never maps, while streaming."""
    rng = random.Random(seed)
    samples: dict[str, Reservoir] = {}
    for index, row in enumerate(read_results(results)):
        label = row.get("explained", "")
        if row["status"] != "ok" or not row["heatmap"] or not label:
            continue
        if classes is not None and label not in classes:
            continue
        samples.setdefault(label, Reservoir(size, rng)).offer(sampled(index, row))
    return samples


def knn_affinity(points: np.ndarray, neighbours: int, block: int = 128) -> np.ndarray:
    """Symmetrised k-nearest-neighbour connectivity: w_ij = 1 when j is among i's
    ``neighbours`` nearest (Euclidean, ties to the lower index) or i among j's.
    Distances are taken ``block`` rows at a time, so the only S x S array is the result."""
    squared = (points ** 2).sum(axis=1)
    affinity = np.zeros((len(points), len(points)))
    for start in range(0, len(points), block):
        rows = slice(start, start + block)
        distances = squared[rows, None] + squared[None, :] - 2 * points[rows] @ points.T
        distances[np.arange(len(distances)), np.arange(len(points))[rows]] = np.inf
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :neighbours]
        np.put_along_axis(affinity[rows], nearest, 1.0, axis=1)
    np.maximum(affinity, affinity.T, out=affinity)
    return affinity


def spectrum(affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the normalised Laplacian
    I - D^-1/2 W D^-1/2, and the degrees. Overwrites ``affinity`` with the Laplacian,
    sparing an S x S copy."""
    degrees = affinity.sum(axis=1)
    scale = 1 / np.sqrt(np.maximum(degrees, 1e-12))
    laplacian = affinity
    laplacian *= scale[:, None]
    laplacian *= -scale[None, :]
    laplacian[np.diag_indices_from(laplacian)] += 1.0
    values, vectors = np.linalg.eigh(laplacian)
    # Only the first MAX_CLUSTERS + 1 eigenvectors are ever read.
    return np.clip(values, 0.0, 2.0), vectors[:, :MAX_CLUSTERS + 1].copy(), degrees


def choose_k(eigenvalues: np.ndarray, max_clusters: int = MAX_CLUSTERS) -> tuple[int, float]:
    """The k in 1..max_clusters with the largest gap lambda_k - lambda_(k-1) (lambda
    0-based, ascending), and that gap."""
    top = min(max_clusters, len(eigenvalues) - 1)
    if top < 1:
        return 1, 0.0
    gaps = np.diff(eigenvalues[:top + 1])
    k = int(np.argmax(gaps)) + 1
    return k, float(gaps[k - 1])


def kmeans(points: np.ndarray, k: int, seed: int = SEED, restarts: int = 10,
           steps: int = 100) -> np.ndarray:
    """Lloyd's k-means from k-means++ starts; the labels of the lowest inertia."""
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(points), dtype=int), np.inf
    for _ in range(restarts):
        centres = _plus_plus(points, k, rng)
        for _ in range(steps):
            distances = ((points[:, None, :] - centres[None]) ** 2).sum(axis=-1)
            labels = distances.argmin(axis=1)
            moved = np.array([points[labels == c].mean(axis=0) if (labels == c).any()
                              else centres[c] for c in range(k)])
            if np.allclose(moved, centres):
                break
            centres = moved
        inertia = distances[np.arange(len(points)), labels].sum()
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def _plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distances = ((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(axis=1)
        total = distances.sum()
        pick = rng.choice(len(points), p=distances / total) if total > 0 \
            else rng.integers(len(points))
        centres.append(points[pick])
    return np.array(centres)


def spectral_labels(vectors: np.ndarray, k: int, seed: int = SEED) -> np.ndarray:
    """Ng-Jordan-Weiss: k-means on the rows of the first k eigenvectors, each row
    scaled to unit length; clusters numbered by size, largest first."""
    if k == 1:
        return np.zeros(len(vectors), dtype=int)
    embedding = vectors[:, :k]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    labels = kmeans(embedding, k, seed)
    # Largest first; ties to the cluster holding the earliest row.
    order = sorted(range(k), key=lambda c: (-(labels == c).sum(), np.argmax(labels == c)))
    renumber = np.empty(k, dtype=int)
    renumber[order] = np.arange(k)
    return renumber[labels]


@dataclass
class ClassClusters:
    """One class's clusters: everything summary.json and the report need."""

    label: str
    rows: int  # the class's ok rows with a heatmap
    indices: np.ndarray  # [S] the sampled rows' indices in results.csv
    maps: np.ndarray  # [S, GRID * GRID] their downsized maps
    labels: np.ndarray  # [S] cluster of each, 0 the largest
    eigenvalues: np.ndarray
    k: int
    eigengap: float
    embedding: np.ndarray  # [S, 2]: the first two non-trivial eigenvectors, D^-1/2 scaled
    empty: int = 0  # sampled rows left out: flat maps, no evidence for the class anywhere
    # [S, 3]: each sampled row's energy-in-box, box area and correct (nan: none)
    figures: np.ndarray | None = None

    def members(self, cluster: int) -> np.ndarray:
        return np.flatnonzero(self.labels == cluster)

    def mean_map(self, cluster: int) -> np.ndarray:
        side = math.isqrt(self.maps.shape[1])  # GRID, or a test's smaller grid
        return self.maps[self.members(cluster)].mean(axis=0).reshape(side, side)

    def exemplars(self, cluster: int, count: int = EXEMPLARS) -> list[int]:
        """Row indices of the members nearest the cluster's mean map."""
        members = self.members(cluster)
        distances = np.linalg.norm(self.maps[members] - self.mean_map(cluster).ravel(), axis=1)
        return [int(self.indices[m]) for m in members[np.argsort(distances, kind="stable")]
                [:count]]

    def minority(self) -> dict[str, Any] | None:
        """The most separated cluster that is small (at most MINORITY_SHARE of the sample
        and at least MINORITY_MIN rows), tight (its spread, its maps' mean distance to
        its mean map, is at most TIGHT times the separation, the distance between its
        mean map and the rest's) and far (the separation is at least the rest's spread
        about the rest's mean map); None when no cluster is all three. ``far`` in the
        result is the separation over the rest's spread."""
        found = None
        for cluster in range(self.k):
            inside = self.labels == cluster
            size = int(inside.sum())
            if size < MINORITY_MIN or size > MINORITY_SHARE * len(self.labels):
                continue
            figures = _separation(self.maps[inside], self.maps[~inside])
            tight = figures["spread"] <= TIGHT * figures["separation"]
            far = figures["separation"] >= figures["rest_spread"]
            if tight and far and (found is None or figures["far"] > found["far"]):
                found = {"cluster": cluster, "size": size,
                         "share": round(size / len(self.labels), 4), **figures}
        return found

    def cluster_figures(self, cluster: int) -> dict[str, Any]:
        """Count, mean energy-in-box, mean box area and accuracy of a cluster's rows;
        the means over its rows with a box (``boxes`` of them) or a label."""
        members = self.members(cluster)
        figures = (self.figures[members] if self.figures is not None
                   else np.full((len(members), 3), np.nan))
        energy, area, correct = figures.T
        boxed, labelled = ~np.isnan(energy), ~np.isnan(correct)
        return {"count": len(members), "boxes": int(boxed.sum()),
                "energy_in_box_mean": _mean(energy[boxed]),
                "box_area_mean": _mean(area[boxed]), "accuracy": _mean(correct[labelled])}

    def background(self, cluster: int, thresholds: Thresholds) -> bool:
        """Whether a cluster's rows are explained by the background (see FAR_BELOW)."""
        figures = self.cluster_figures(cluster)
        if self.k < 2 or figures["boxes"] < MINORITY_MIN or self.figures is None:
            return False
        energy = figures["energy_in_box_mean"]
        if energy >= thresholds.flag_energy:
            return False
        if energy < thresholds.flag_lift * figures["box_area_mean"]:
            return True
        rest = self.figures[self.labels != cluster, 0]
        rest = rest[~np.isnan(rest)]
        return bool(len(rest)) and energy <= FAR_BELOW * float(rest.mean())

    def to_json(self, thresholds: Thresholds | None = None) -> dict[str, Any]:
        """This class's entry in summary.json's ``clusters.per_class``; with
        ``thresholds``, clusters explained by the background get a note."""
        minority = self.minority()
        data: dict[str, Any] = {
            "rows": self.rows, "sampled": len(self.indices) + self.empty,
            "empty": self.empty, "neighbours": neighbours_for(len(self.indices)), "k": self.k,
            "eigengap": round(self.eigengap, 4),
            "eigenvalues": [round(float(v), 4) for v in self.eigenvalues[:MAX_CLUSTERS + 1]],
            "sizes": [int((self.labels == c).sum()) for c in range(self.k)],
            "clusters": [{"size": len(self.members(c)),
                          "members": sorted(int(self.indices[m]) for m in self.members(c))
                          [:MEMBERS],
                          "exemplars": self.exemplars(c),
                          "mean_heatmap": np.round(self.mean_map(c), 5).tolist(),
                          **self.cluster_figures(c)}
                         for c in range(self.k)],
            "minority": minority,
        }
        if minority is not None:
            data["note"] = MINORITY_NOTE
        background = [] if thresholds is None else [
            c for c in range(self.k) if self.background(c, thresholds)]
        if len(background) == self.k:  # the whole class: its flag says so, not a cluster
            background = []
        for c in background:
            data["clusters"][c]["note"] = BACKGROUND_NOTE.format(count=len(self.members(c)))
        data["background"] = background
        return data


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def _separation(inside: np.ndarray, rest: np.ndarray) -> dict[str, float]:
    centre, rest_centre = inside.mean(axis=0), rest.mean(axis=0)
    spread = float(np.linalg.norm(inside - centre, axis=1).mean())
    rest_spread = float(np.linalg.norm(rest - rest_centre, axis=1).mean())
    separation = float(np.linalg.norm(centre - rest_centre))
    return {"spread": round(spread, 5), "rest_spread": round(rest_spread, 5),
            "separation": round(separation, 5),
            "far": round(separation / max(rest_spread, 1e-12), 4)}


def neighbours_for(count: int) -> int:
    return max(1, min(NEIGHBOURS, math.ceil(math.sqrt(count)), count - 1))


def cluster_maps(label: str, rows: int, indices: np.ndarray, maps: np.ndarray,
                 seed: int = SEED) -> ClassClusters:
    """Cluster one class's downsized maps ([S, GRID * GRID])."""
    count = len(maps)
    if count < 3:
        return ClassClusters(label, rows, indices, maps, np.zeros(count, dtype=int),
                             np.zeros(count), min(count, 1), 0.0, np.zeros((count, 2)))
    affinity = knn_affinity(maps, neighbours_for(count))
    eigenvalues, vectors, degrees = spectrum(affinity)
    k, gap = choose_k(eigenvalues)
    labels = spectral_labels(vectors, k, seed)
    k = int(labels.max()) + 1  # k-means may leave a cluster empty; those are numbered last
    embedding = vectors[:, 1:3] / np.sqrt(degrees)[:, None]
    return ClassClusters(label, rows, indices, maps, labels, eigenvalues, k, gap, embedding)


def cluster_classes(results: Path, out: Path, sample: int = SAMPLE,
                    classes: list[str] | None = None) -> dict[str, ClassClusters]:
    """Per explained class, the clusters of a sample of at most ``sample`` of its rows.
    Peak memory: the reservoirs' (index, reference) pairs, then one class's sample of
    maps and its sample x sample affinity at a time."""
    found: dict[str, ClassClusters] = {}
    for label, reservoir in sorted(sample_rows(results, sample, classes).items()):
        maps, indices, figures, empty = [], [], [], 0
        for item in sorted(reservoir.items):
            index = item.row
            try:
                small = downsize(read_heatmap(item.heatmap, out)).ravel()
            except (OnnxcamError, OSError, ValueError) as exc:
                log.warning("row %d left out of %s's clusters: %s", index, label, exc)
                continue
            # Empty maps all coincide: they would make a "strategy" of no evidence.
            if small.any():
                maps.append(small)
                indices.append(index)
                figures.append(item[2:])
            else:
                empty += 1
        found[label] = cluster_maps(label, reservoir.seen, np.array(indices, dtype=int),
                                    np.array(maps).reshape(len(maps), GRID * GRID))
        found[label].empty = empty
        found[label].figures = np.array(figures, dtype=np.float64).reshape(len(figures), 3)
    return found


def rows_at(results: Path, wanted: set[int]) -> dict[int, ResultRow]:
    """The results.csv rows at ``wanted`` indices, by one more streaming pass."""
    found: dict[int, ResultRow] = {}
    if not wanted:
        return found
    for index, row in enumerate(read_results(results)):
        if index in wanted:
            row["index"] = str(index)
            found[index] = row
            if len(found) == len(wanted):
                break
    return found


def clusters_json(found: dict[str, ClassClusters], sample: int,
                  thresholds: Thresholds | None = None) -> dict[str, Any]:
    """summary.json's ``clusters``: the settings, then each class's clusters."""
    per_class = {label: found[label].to_json(thresholds) for label in sorted(found)}
    return {"sample": sample, "grid": GRID, "max_neighbours": NEIGHBOURS,
            "max_clusters": MAX_CLUSTERS, "per_class": per_class,
            "minority": [label for label, data in per_class.items() if data["minority"]],
            "background": [label for label, data in per_class.items()
                           if data["background"]]}

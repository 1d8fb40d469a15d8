"""The audit: manifest rows in, through a backend, out as results.csv, summary.json
and report.html.

The runner does not care where explanations are computed. It reads the manifest
lazily, hands the backend chunks, computes the metrics of each outcome as it
arrives (writing its heatmap at once), and appends results.csv lines strictly in
manifest order as soon as the finished prefix grows. Only finished-but-early CSV
lines and the rows in flight are held in memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit import results as results_file
from onnxcam.audit.advice import advise
from onnxcam.audit.backend import (
    EXPLAIN_MODES,
    AuditRow,
    Backend,
    ExplainSettings,
    RowOutcome,
)
from onnxcam.audit.clusters import SAMPLE, cluster_classes, clusters_json, rows_at
from onnxcam.audit.detection import COLUMNS as DETECTION_COLUMNS
from onnxcam.audit.detection import image_lines, summarize_detections
from onnxcam.audit.detection_report import write_detection_report
from onnxcam.audit.manifest import (
    SINGLE,
    LabelMap,
    RowProblem,
    check_categories,
    count_rows,
    manifest_form,
    read_manifest,
    region_of,
    source_record,
)
from onnxcam.audit.metrics import energy_in_box, pointing_hit
from onnxcam.audit.report import write_report
from onnxcam.audit.results import COLUMNS, MULTI_COLUMNS, ResultRow, ResultsWriter
from onnxcam.audit.summary import Summary, Thresholds, summarize
from onnxcam.bundle import HEAD_SIGMOID, OUTPUT_PIXELS, BundleInfo
from onnxcam.engine.explainer import method_for
from onnxcam.engine.maps import heatmaps
from onnxcam.engine.outputs import npy_bytes
from onnxcam.engine.targets import DEFAULT_THRESHOLD, class_scores
from onnxcam.errors import AuditError, OnnxcamError
from onnxcam.files import atomic_write
from onnxcam.progress import Progress
from onnxcam.scores import probabilities

log = logging.getLogger(__name__)

RESULTS = "results.csv"
SUMMARY = "summary.json"
REPORT = "report.html"
HEATMAPS = "heatmaps"


@dataclass(frozen=True)
class AuditOptions:
    settings: ExplainSettings = field(default_factory=ExplainSettings)
    chunk_size: int = 32
    resume: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    label_map: LabelMap | None = None  # COCO/VOC category name -> bundle label
    clusters_sample: int = SAMPLE  # rows per class clustered at most; 0: no clusters


def run_audit(
    source: Path,
    out: Path,
    backend: Backend,
    options: AuditOptions = AuditOptions(),
    progress: Progress | None = None,
) -> Summary:
    """Audit every row of ``source`` into ``out``; see the module docstring.

    Raises AuditError when ``out`` already holds results and ``options.resume`` is
    off. On KeyboardInterrupt every finished row in order is on disk before it
    propagates, and a later run with ``resume`` carries on from there.
    """
    settings = options.settings
    _check(backend, options)
    if backend.info.detector:
        return _run_detection_audit(source, out, backend, options, progress)
    total = count_rows(source, options.label_map)
    path = _results_path(out, options.resume)
    form = manifest_form(source)
    resume = results_file.resume if form == SINGLE else results_file.resume_lines
    done = resume(path, _images(source, backend, options.label_map)) if options.resume else 0
    if done:
        log.info("resuming after %d rows already in %s", done, path)
    progress = progress or Progress(total, done=done)
    progress.skipped = progress.done = done
    started = time.monotonic()
    writer = ResultsWriter(path, COLUMNS if form == SINGLE else MULTI_COLUMNS)
    try:
        Ordering(source, out, backend, options, writer, progress, done).run()
    finally:
        writer.close()
    progress.finish()
    info = backend.info
    classes = [info.label(k) for k in range(info.num_classes)]
    summary = summarize(path, options.thresholds, classes)
    summary.data.update(_context(backend, settings, time.monotonic() - started, done))
    summary.data["source"] = source_record(source)
    if form != SINGLE:  # single-label audits' summary.json stays as it was
        summary.data["form"] = form
        summary.data["threshold"] = settings.threshold
    if options.clusters_sample:
        _add_clusters(summary, out, options.clusters_sample, classes, options.thresholds)
    summary.data["advice"] = advise(summary.data)
    atomic_write(out / SUMMARY, (json.dumps(summary.data, indent=2) + "\n").encode())
    write_report(summary, out / REPORT,
                 _worst_rows(source, backend, summary, options.label_map), out)
    return summary


def _results_path(out: Path, resume: bool) -> Path:
    """``out``'s results file, ``out`` made; refused when it exists and not ``resume``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    if path.exists() and not resume:
        raise AuditError(f"{path} exists: pass --resume to carry on with it, or choose "
                         "another --out")
    return path


def _run_detection_audit(source: Path, out: Path, backend: Backend, options: AuditOptions,
                         progress: Progress | None) -> Summary:
    """``run_audit`` for a detection bundle: a line per detection and per missed object
    (``audit.detection``), per-class detection figures, no clusters."""
    if options.settings.faithfulness:
        raise AuditError("--faithfulness does not apply to a detection bundle (its AUCs are "
                         "of a class's probability over the whole image)")
    if options.settings.explain != "label" or options.settings.threshold != DEFAULT_THRESHOLD:
        raise AuditError("--explain and --threshold do not apply to a detection bundle: every "
                         "detection is explained for its own class, as the model picked it")
    total = check_categories(source, backend.info, options.label_map)
    path = _results_path(out, options.resume)
    done = results_file.resume_lines(path, _images(source, backend, options.label_map),
                                     DETECTION_COLUMNS) if options.resume else 0
    progress = progress or Progress(total, done=done)
    progress.skipped = progress.done = done
    started = time.monotonic()
    writer = ResultsWriter(path, DETECTION_COLUMNS)
    try:
        DetectionOrdering(source, out, backend, options, writer, progress, done).run()
    finally:
        writer.close()
    progress.finish()
    info = backend.info
    summary = summarize_detections(path, options.thresholds,
                                   [info.label(k) for k in range(info.num_classes)])
    summary.data.update(_context(backend, options.settings, time.monotonic() - started, done))
    summary.data["source"] = source_record(source)
    summary.data["advice"] = advise(summary.data)
    atomic_write(out / SUMMARY, (json.dumps(summary.data, indent=2) + "\n").encode())
    write_detection_report(summary, out / REPORT, out)
    return summary


def _add_clusters(summary: Summary, out: Path, sample: int, classes: list[str],
                  thresholds: Thresholds) -> None:
    """Strategy clusters from results.csv and the stored maps, after the run."""
    started = time.monotonic()
    found = cluster_classes(out / RESULTS, out, sample, classes)
    summary.clusters = found
    summary.data["clusters"] = clusters_json(found, sample, thresholds)
    wanted = {index for clusters in found.values() for cluster in range(clusters.k)
              for index in clusters.exemplars(cluster)}
    # The report lists the images of clusters explained by the background.
    wanted |= {index for entry in summary.data["clusters"]["per_class"].values()
               for cluster in entry["background"]
               for index in entry["clusters"][cluster]["members"]}
    summary.cluster_rows = rows_at(out / RESULTS, wanted)
    log.info("clustered %d classes in %.1f s", len(found), time.monotonic() - started)


def _check(backend: Backend, options: AuditOptions) -> None:
    method_for(backend.info, options.settings.method)
    if options.settings.explain not in EXPLAIN_MODES:
        raise AuditError(f"explain must be one of {', '.join(EXPLAIN_MODES)}")
    if options.chunk_size < 1:
        raise AuditError("the chunk size must be at least 1")
    if not 0 < options.settings.threshold < 1:
        raise AuditError("the threshold must be strictly between 0 and 1")
    if options.clusters_sample < 0 or options.clusters_sample in (1, 2):
        raise AuditError("the clusters' sample must be 0 (no clusters) or at least 3 rows")


def _images(source: Path, backend: Backend, label_map: LabelMap | None) -> Iterator[str]:
    return (entry.image for entry in read_manifest(source, backend.info, label_map))


def _context(backend: Backend, settings: ExplainSettings, seconds: float,
             resumed: int) -> dict[str, Any]:
    info = backend.info
    return {
        "method": settings.method,
        "explain": settings.explain,
        "faithfulness": settings.faithfulness,
        "bundle": {"source_sha256": info.source_sha256, "target_layer": info.target_layer,
                   "labels": list(info.labels)},
        "seconds": round(seconds, 2),
        "resumed_after": resumed,
    }


def _worst_rows(source: Path, backend: Backend, summary: Summary,
                label_map: LabelMap | None) -> dict[int, AuditRow]:
    """By results.csv line, the manifest rows (boxes, masks) of the worst cases, by one
    more lazy pass; a multi-label or segmentation line gets its finding."""
    wanted: dict[int, dict[int, str]] = {}  # manifest row -> line -> label
    for row in summary.shown_rows():
        line = int(row["index"])
        wanted.setdefault(int(row.get("row") or line), {})[line] = row["label"]
    found: dict[int, AuditRow] = {}
    if not wanted:
        return found
    names = {backend.info.label(k): k for k in range(backend.info.num_classes)}
    for entry in read_manifest(source, backend.info, label_map):
        lines = wanted.pop(entry.index, None)
        if lines is not None and isinstance(entry, AuditRow):
            for line, label in lines.items():
                finding = (entry.finding(names.get(label, -1)) if entry.multi and label
                           else entry)
                if finding is not None:
                    found[line] = finding
        if not wanted:
            break
    return found


class Ordering:
    """Feeds the backend and writes its outcomes back in manifest order."""

    def __init__(self, source: Path, out: Path, backend: Backend, options: AuditOptions,
                 writer: ResultsWriter, progress: Progress, done: int) -> None:
        self.source, self.out, self.backend, self.options = source, out, backend, options
        self.writer, self.progress = writer, progress
        self.next_index = done  # the first row not yet in results.csv
        self.in_flight: dict[int, AuditRow] = {}
        self.finished: dict[int, list[ResultRow]] = {}

    def run(self) -> None:
        stream = self.backend.run(self.chunks(), self.options.settings)
        try:
            for outcomes in stream:
                for outcome in outcomes:
                    row = self.in_flight.pop(outcome.index, None)
                    if row is None:
                        log.warning("ignoring an outcome for row %d, not in flight",
                                    outcome.index)
                        continue
                    self.finished[outcome.index] = self.results(row, outcome)
                self.progress.advance(len(outcomes))
                self.write_prefix()
        finally:
            close = getattr(stream, "close", None)  # a generator's: runs the backend's cleanup
            if close is not None:
                close()
            self.write_prefix()
        if self.in_flight:
            missing = sorted(self.in_flight)[:5]
            raise AuditError(f"the backend returned no outcome for {len(self.in_flight)} "
                             f"row(s), e.g. rows {missing}")

    def chunks(self) -> Iterator[list[AuditRow]]:
        chunk: list[AuditRow] = []
        entries = islice(read_manifest(self.source, self.backend.info, self.options.label_map),
                         self.next_index, None)
        for entry in entries:
            if isinstance(entry, RowProblem):
                self.finished[entry.index] = [{"image": entry.image, "label": entry.label,
                                               "row": str(entry.index), "status": "error",
                                               "error": f"{entry.error.code}: {entry.error}"}]
                self.progress.advance()
                continue
            self.in_flight[entry.index] = entry
            chunk.append(entry)
            if len(chunk) == self.options.chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def write_prefix(self) -> None:
        ready = []
        while self.next_index in self.finished:
            ready.extend(self.finished.pop(self.next_index))
            self.next_index += 1
        if ready:
            self.writer.write(ready)
            self.writer.sync()

    def label(self, index: int | None) -> str:
        return "" if index is None or index < 0 else self.backend.info.label(index)

    def results(self, row: AuditRow, outcome: RowOutcome) -> list[ResultRow]:
        """The results.csv lines of one outcome (one per map), their heatmaps written."""
        if not row.multi:
            return [self.result(row, outcome)]
        base = {"image": row.image, "row": str(row.index)}
        if not outcome.ok or outcome.maps is None or not outcome.scored:
            # A line per finding, so that each class counts its errors.
            error = {**base, "status": "error", "error": f"{outcome.error_code}: {outcome.error}"}
            return [{**error, "label": self.label(f.label)} for f in row.findings] or [error]
        scores = class_scores_of(outcome, self.backend.info)
        predicted = predicted_classes(scores, self.backend.info,
                                      self.options.settings.threshold)
        pred = "|".join(self.label(int(k)) for k in predicted)
        if not outcome.maps:  # nothing over the threshold to explain
            return [{**base, "pred": pred, "status": "ok"}]
        return [self.finding_result(row, outcome, number, predicted, scores)
                | base | {"pred": pred} for number in range(len(outcome.maps))]

    def finding_result(self, row: AuditRow, outcome: RowOutcome, number: int,
                       predicted: np.ndarray, scores: np.ndarray) -> ResultRow:
        """The line of a multi row's ``number``-th map: its class's finding's label and
        region (none for a class explained but not among the findings)."""
        found = outcome.maps[number]  # type: ignore[index]
        finding = row.finding(found.target)
        base = {"label": self.label(finding.label if finding else None),
                "explained": self.label(found.target)}
        try:
            measured = measure(finding, found.raw, outcome.image_size) if finding else {}
        except OnnxcamError as exc:
            return {**base, "status": "error", "error": f"{exc.code}: {exc}"}
        heatmap = found.heatmap or self.write_heatmap(f"{row.index}-{number}", found.raw)
        # Explained for its label: whether the model predicts it. Explained because the
        # model predicts it: whether the row lists it (else a false positive).
        if self.options.settings.explain == "label":
            correct = "" if finding is None else str(int(found.target in predicted))
        else:
            correct = str(int(finding is not None))
        result = {
            **base, **measured,
            "score": f"{scores[found.target]:.4f}",
            "correct": correct,
            "heatmap": heatmap,
            "status": "ok",
        }
        for key, value in (found.faithfulness or {}).items():
            result[key] = f"{value:.4f}"
        return result

    def result(self, row: AuditRow, outcome: RowOutcome) -> ResultRow:
        """The results.csv line of one outcome, its heatmap written."""
        base = {"image": row.image, "label": self.label(row.label)}
        if not outcome.ok or outcome.raw is None or not outcome.scored:
            return {**base, "status": "error", "error": f"{outcome.error_code}: {outcome.error}"}
        try:
            measured = measure(row, outcome.raw, outcome.image_size)
        except OnnxcamError as exc:
            return {**base, "status": "error", "error": f"{exc.code}: {exc}"}
        heatmap = outcome.heatmap or self.write_heatmap(row.index, outcome.raw)
        scores = class_scores_of(outcome, self.backend.info)
        pred = int(np.argmax(scores))
        result = {
            **base, **measured,
            "pred": self.label(pred),
            "score": f"{scores[pred]:.4f}",
            "correct": "" if row.label is None else str(int(pred == row.label)),
            "heatmap": heatmap,
            "status": "ok",
            "explained": self.label(outcome.target),
        }
        for key, value in (outcome.faithfulness or {}).items():
            result[key] = f"{value:.4f}"
        return result

    def write_heatmap(self, index: int | str, raw: np.ndarray) -> str:
        name = f"{HEATMAPS}/{index}.npy"
        atomic_write(self.out / name, npy_bytes(raw.astype(np.float16)))
        return name


class DetectionOrdering(Ordering):
    """``Ordering`` for a detection audit: an image's lines from its detections."""

    def results(self, row: AuditRow, outcome: RowOutcome) -> list[ResultRow]:
        try:
            return image_lines(row, outcome, self.label, self.write_heatmap)
        except OnnxcamError as exc:  # a backend's outcome this audit cannot read
            return image_lines(row, RowOutcome.failed(row.index, exc), self.label,
                               self.write_heatmap)


def class_scores_of(outcome: RowOutcome, info: BundleInfo) -> np.ndarray:
    """float64 [K]: a classifier's probabilities by its head; a segmenter's share of
    pixels each class wins (the backend's own, where it has no logits)."""
    if outcome.scores is not None:
        return outcome.scores
    logits = outcome.logits
    assert logits is not None  # a scored outcome has one or the other
    if info.output == OUTPUT_PIXELS:
        return class_scores(logits[None], info)[0].astype(np.float64)
    return probabilities(logits.astype(np.float64), info.head)


def predicted_classes(scores: np.ndarray, info: BundleInfo,
                      threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The classes a multi row's image is predicted to hold: over ``threshold`` for a
    sigmoid head, the top-1 for another classifier, any pixel's for a segmenter."""
    if info.output == OUTPUT_PIXELS:
        return np.flatnonzero(scores > 0)
    if info.head == HEAD_SIGMOID:
        return np.flatnonzero(scores > threshold)
    return np.array([int(np.argmax(scores))])


def measure(row: AuditRow, raw: np.ndarray, image_size: tuple[int, int]) -> dict[str, str]:
    """Energy-in-box, pointing hit and box area of one row, on its heatmap at the
    original image's size; empty when the row has neither box nor mask."""
    if not row.has_region:
        return {}
    height, width = image_size
    region = region_of(row, height, width)
    heatmap = heatmaps(raw[None].astype(np.float32), height, width)[0]
    return {
        "energy_in_box": f"{energy_in_box(heatmap, region):.4f}",
        "pointing_hit": str(int(pointing_hit(heatmap, region))),
        "box_area": f"{region.mean():.4f}",
    }

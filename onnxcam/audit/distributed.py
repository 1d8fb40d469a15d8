"""The audit across the workers: each chunk of rows becomes one explain job, each row's
image one entry of it, with all its targets (a multi row's findings, or all-positive).

The workers decode, explain and store heatmaps as for any job (``onnxcam.worker.jobs``);
this backend keeps a bounded number of jobs in flight, and turns each finished
job's records and raw maps back into ``RowOutcome``s. The runner computes the
metrics from the raw maps exactly as in-process, so both give the same numbers.
A worker that dies mid-chunk delays its job until the broker redelivers it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.backend import AuditRow, ExplainSettings, MapOutcome, RowOutcome
from onnxcam.bundle import read_bundle
from onnxcam.engine.detections import Detection
from onnxcam.errors import AuditError
from onnxcam.worker.client import celery_status, job_records, submit
from onnxcam.worker.settings import Settings, load_settings
from onnxcam.worker.store import Store

POLL_SECONDS = 0.1


class DistributedBackend:
    """Fans chunks out to ``onnxcam worker`` processes through the broker."""

    def __init__(self, broker_url: str, model: str | Path, in_flight: int = 8,
                 settings: Settings | None = None) -> None:
        self.settings = settings or load_settings(broker_url=broker_url)
        self.store = Store(self.settings.store_url)
        bundle = read_bundle(model)
        self.info = bundle.info
        self.sha = self.store.put_bundle(bundle.data)
        self.in_flight = in_flight

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        pending: dict[str, list[AuditRow]] = {}
        iterator = iter(chunks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.in_flight:
                rows = next(iterator, None)
                if rows is None:
                    exhausted = True
                else:
                    targets = [job_targets(row, settings) for row in rows]
                    pending[self._submit(rows, targets, settings)] = rows
            finished = [job_id for job_id in pending
                        if celery_status(job_id, self.settings) in ("done", "failed")]
            if not finished:
                time.sleep(POLL_SECONDS)
            for job_id in finished:
                yield self._read(job_id, pending.pop(job_id))

    def _submit(self, rows: list[AuditRow], targets: list[Any],
                settings: ExplainSettings) -> str:
        """One job, an image entry per row with its targets (None: the top-1). A
        single-label chunk's message stays as it was, without a threshold."""
        steps = settings.steps if settings.faithfulness else 0
        threshold = (settings.threshold if any(row.multi and row.objects is None for row in rows)
                     else None)
        job = submit(self.sha, [row.image for row in rows], settings.method, targets,
                     chunk_size=len(rows), settings=self.settings, faithfulness_steps=steps,
                     threshold=threshold)
        (job_id,) = job.ids
        return job_id

    def _read(self, job_id: str, rows: list[AuditRow]) -> list[RowOutcome]:
        """The outcomes of a finished job's rows, from its records."""
        by_image = {index: list(records) for index, records in
                    groupby(job_records(job_id, self.store), key=lambda r: int(r["index"]))}
        return [self._outcome(row, by_image[position]) for position, row in enumerate(rows)]

    def _outcome(self, row: AuditRow, records: list[dict[str, Any]]) -> RowOutcome:
        """A row's outcome from its image's records: one per map (an image all-positive
        found nothing in has one, with no map), or one error record."""
        first = records[0]
        if first["status"] != "ok":
            code, message = error_of(first)
            return RowOutcome(row.index, error_code=code, error=message)
        height, width = first["image_size"]
        outcome = RowOutcome(row.index, image_size=(int(height), int(width)))
        if row.objects is not None:  # a detector's: a row per detection, no image scores
            outcome.maps = [MapOutcome(int(r["class"]), self._raw(r), r["files"]["raw"],
                                       detection=detection_of(r))
                            for r in records if "files" in r]
            return outcome
        try:
            outcome.logits, outcome.scores = record_scores(first, self.info.num_classes)
        except AuditError as exc:
            return RowOutcome.failed(row.index, exc)
        maps = [MapOutcome(int(r["target"]), self._raw(r), r["files"]["raw"],
                           r.get("faithfulness")) for r in records if "files" in r]
        if row.multi:
            outcome.maps = maps
        else:
            (found,) = maps
            outcome.raw, outcome.target = found.raw, found.target
            outcome.heatmap, outcome.faithfulness = found.heatmap, found.faithfulness
        return outcome

    def _raw(self, record: dict[str, Any]) -> np.ndarray:
        uri = record["files"]["raw"]
        key = self.store.owns(uri)
        if key is None:  # workers write into the store the job names; never elsewhere
            raise AuditError(f"a worker stored a map at {uri}, outside {self.store.location}")
        return np.load(io.BytesIO(self.store.get(key))).astype(np.float32)


def job_targets(row: AuditRow, settings: ExplainSettings) -> Any:
    """A row's entry in the job message's ``targets``: a single-label row's class (None:
    the top-1), a multi row's list (its findings' classes, or all-positive)."""
    if row.objects is not None:
        return None  # a detection bundle's: every detection
    if row.multi:
        return settings.targets(row)
    target = settings.target(row)
    return None if target < 0 else target


def detection_of(row: dict[str, Any]) -> Detection:
    """A detection's row of a worker's record as a ``Detection``, its box in the image's
    own pixels."""
    x0, y0, x1, y1 = (float(v) for v in row["box"])
    return Detection((x0, y0, x1, y1), float(row["score"]), int(row["class"]),
                     str(row["label"]), int(row["anchor"]), int(row["rank"]))


def error_of(record: dict[str, Any]) -> tuple[str, str]:
    error = record["error"]
    return error["code"], error["message"]


def record_scores(record: dict[str, Any],
                  classes: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """An ok record's image scores as (logits, scores): a classifier's ``logits``, or a
    segmenter's ``scores`` (each class's share of the pixels; its logits are per pixel
    and stay out of records). AuditError for a record with neither (from a worker that
    predates ``scores``) or with another class count."""
    for key in ("logits", "scores"):
        found = record.get(key)
        if found is not None:
            if len(found) != classes:
                raise AuditError(f"{record['image']}: the worker's record holds "
                                 f"{len(found)} {key}, not the bundle's {classes}")
            if key == "logits":
                return np.asarray(found, np.float32), None
            return None, np.asarray(found, np.float64)
    raise AuditError(f"{record['image']}: the worker's record holds no logits or scores "
                     "(a worker older than this audit? upgrade the workers)")

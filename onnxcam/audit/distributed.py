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
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.backend import AuditRow, ExplainSettings, MapOutcome, RowOutcome
from onnxcam.bundle import OUTPUT_PIXELS, read_bundle
from onnxcam.errors import AuditError
from onnxcam.worker.client import celery_status, job_records, submit
from onnxcam.worker.settings import Settings, load_settings
from onnxcam.worker.store import Store

log = logging.getLogger(__name__)

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
        self.warned = False  # about a segmenter's pixel shares cut to the record's top

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        pending: dict[str, Sent] = {}
        iterator = iter(chunks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.in_flight:
                rows = next(iterator, None)
                if rows is None:
                    exhausted = True
                else:
                    targets = [job_targets(row, settings) for row in rows]
                    pending[self._submit(rows, targets, settings)] = Sent(rows)
            finished = [job_id for job_id in pending
                        if celery_status(job_id, self.settings) in ("done", "failed")]
            if not finished:
                time.sleep(POLL_SECONDS)
            for job_id in finished:
                sent = pending.pop(job_id)
                unscored = self._read(job_id, sent)
                if unscored:
                    pending[self._ask_scores(unscored, sent, settings)] = sent
                else:
                    yield sent.outcomes

    def _submit(self, rows: list[AuditRow], targets: list[Any],
                settings: ExplainSettings) -> str:
        """One job, an image entry per row with its targets (None: the top-1). A
        single-label chunk's message stays as it was, without a threshold."""
        steps = settings.steps if settings.faithfulness else 0
        threshold = settings.threshold if any(row.multi for row in rows) else None
        job = submit(self.sha, [row.image for row in rows], settings.method, targets,
                     chunk_size=len(rows), settings=self.settings, faithfulness_steps=steps,
                     threshold=threshold)
        (job_id,) = job.ids
        return job_id

    def _read(self, job_id: str, sent: Sent) -> list[RowOutcome]:
        """Fill ``sent``'s outcomes from a finished job: a chunk's own, or the scores a
        follow-up asked for. Returns the outcomes still without scores."""
        by_image = {index: list(rows) for index, rows in
                    groupby(job_records(job_id, self.store), key=lambda r: int(r["index"]))}
        if sent.asked is not None:  # a follow-up: one top-1 entry per unscored outcome
            for position, outcome in enumerate(sent.asked):
                record = by_image[position][0]
                if record["status"] != "ok":
                    outcome.error_code, outcome.error = error_of(record)
                else:
                    self._score(outcome, record)
            sent.asked = None
            return []
        sent.outcomes = [self._outcome(row, by_image[position])
                         for position, row in enumerate(sent.rows)]
        return [outcome for outcome in sent.outcomes if outcome.ok and not outcome.scored]

    def _ask_scores(self, unscored: list[RowOutcome], sent: Sent,
                    settings: ExplainSettings) -> str:
        """A follow-up job for the images all-positive found nothing in: a worker's record
        of such an image holds no scores, and the row still shows its ``pred``. It asks
        for their top-1 alone, without faithfulness."""
        sent.asked = unscored
        rows = {row.index: row for row in sent.rows}
        return self._submit([rows[o.index] for o in unscored], [None] * len(unscored),
                            replace(settings, faithfulness=False))

    def _outcome(self, row: AuditRow, records: list[dict[str, Any]]) -> RowOutcome:
        """A row's outcome from its image's records: one per map (an image all-positive
        found nothing in has one, with no map), or one error record."""
        first = records[0]
        if first["status"] != "ok":
            code, message = error_of(first)
            return RowOutcome(row.index, error_code=code, error=message)
        height, width = first["image_size"]
        outcome = RowOutcome(row.index, image_size=(int(height), int(width)))
        self._score(outcome, first)
        maps = [MapOutcome(int(r["target"]), self._raw(r), r["files"]["raw"],
                           r.get("faithfulness")) for r in records if "files" in r]
        if row.multi:
            outcome.maps = maps
        else:
            (found,) = maps
            outcome.raw, outcome.target = found.raw, found.target
            outcome.heatmap, outcome.faithfulness = found.heatmap, found.faithfulness
        return outcome

    def _score(self, outcome: RowOutcome, record: dict[str, Any]) -> None:
        """The image's logits; a segmenter's record has none (they are per pixel), and
        its classes' shares of pixels are those of its ``top`` (at most five; the other
        classes read 0)."""
        if record.get("logits") is not None:
            outcome.logits = np.asarray(record["logits"], np.float32)
        elif self.info.output == OUTPUT_PIXELS and "top" in record:
            outcome.scores = np.zeros(self.info.num_classes, np.float64)
            for entry in record["top"]:
                outcome.scores[int(entry["class"])] = float(entry["score"])
            if outcome.scores.sum() < 1 - 1e-4 and not self.warned:
                self.warned = True
                log.warning("%s: more classes win pixels than the worker's record lists "
                            "(%d); the others read 0 in pred, score and correct",
                            record["image"], len(record["top"]))

    def _raw(self, record: dict[str, Any]) -> np.ndarray:
        uri = record["files"]["raw"]
        key = self.store.owns(uri)
        if key is None:  # workers write into the store the job names; never elsewhere
            raise AuditError(f"a worker stored a map at {uri}, outside {self.store.location}")
        return np.load(io.BytesIO(self.store.get(key))).astype(np.float32)


@dataclass
class Sent:
    """A chunk in flight: its rows, and once its job is read their outcomes and, while
    a follow-up job fetches their scores, the outcomes it was asked for."""

    rows: list[AuditRow]
    outcomes: list[RowOutcome] = field(default_factory=list)
    asked: list[RowOutcome] | None = None


def job_targets(row: AuditRow, settings: ExplainSettings) -> Any:
    """A row's entry in the job message's ``targets``: a single-label row's class (None:
    the top-1), a multi row's list (its findings' classes, or all-positive)."""
    if row.multi:
        return settings.targets(row)
    target = settings.target(row)
    return None if target < 0 else target


def error_of(record: dict[str, Any]) -> tuple[str, str]:
    error = record["error"]
    return error["code"], error["message"]

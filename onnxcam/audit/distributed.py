"""The audit across the workers: each chunk of rows becomes one explain job.

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
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.backend import AuditRow, ExplainSettings, MapOutcome, RowOutcome
from onnxcam.bundle import read_bundle
from onnxcam.errors import AuditError
from onnxcam.worker.client import celery_status, job_records, submit
from onnxcam.worker.keys import RAW, image_key
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

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        pending: dict[str, list[Entry]] = {}
        iterator = iter(chunks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.in_flight:
                rows = next(iterator, None)
                if rows is None:
                    exhausted = True
                else:
                    entries = [(row, target) for row in rows
                               for target in job_targets(row, settings)]
                    pending[self._submit(entries, settings)] = entries
            finished = [job_id for job_id in pending
                        if celery_status(job_id, self.settings) in ("done", "failed")]
            if not finished:
                time.sleep(POLL_SECONDS)
            for job_id in finished:
                yield self._outcomes(job_id, pending.pop(job_id))

    def _submit(self, entries: list[Entry], settings: ExplainSettings) -> str:
        job = submit(self.sha, [row.image for row, _ in entries], settings.method,
                     [t if t >= 0 else None for _, t in entries], chunk_size=len(entries),
                     settings=self.settings,
                     faithfulness_steps=settings.steps if settings.faithfulness else 0)
        (job_id,) = job.ids
        return job_id

    def _outcomes(self, job_id: str, entries: list[Entry]) -> list[RowOutcome]:
        records = job_records(job_id, self.store)
        outcomes: dict[int, RowOutcome] = {}
        for (row, _), record in zip(entries, records):
            outcome = self._outcome(job_id, row, record)
            if not row.multi:
                outcomes[row.index] = outcome
                continue
            joined = outcomes.setdefault(row.index, RowOutcome(
                row.index, logits=outcome.logits, image_size=outcome.image_size, maps=[]))
            if not outcome.ok and joined.ok:  # a map that failed fails its row
                joined.error_code, joined.error = outcome.error_code, outcome.error
            elif outcome.raw is not None:
                joined.maps.append(MapOutcome(  # type: ignore[union-attr]
                    outcome.target, outcome.raw, outcome.heatmap, outcome.faithfulness))
        return list(outcomes.values())

    def _outcome(self, job_id: str, row: AuditRow, record: dict[str, Any]) -> RowOutcome:
        if record["status"] != "ok":
            error = record["error"]
            return RowOutcome(row.index, error_code=error["code"], error=error["message"])
        raw = np.load(io.BytesIO(self.store.get(image_key(job_id, record["index"], RAW))))
        height, width = record["image_size"]
        return RowOutcome(
            row.index, raw=raw.astype(np.float32),
            logits=np.asarray(record["logits"], np.float32), target=int(record["target"]),
            image_size=(int(height), int(width)), heatmap=record["files"]["raw"],
            faithfulness=record.get("faithfulness"),
        )


Entry = tuple[AuditRow, int]  # a row and one class it is explained for (-1: top-1)


def job_targets(row: AuditRow, settings: ExplainSettings) -> list[int]:
    """The classes a row's image is sent with, one image entry each: today's job
    message takes one class per image, so a multi row's image is listed once per
    finding; the predicted classes of a multi row (``all-positive``) it cannot ask for."""
    if not row.multi:
        return [settings.target(row)]
    targets = settings.targets(row)
    if not all(isinstance(t, int) for t in targets):
        raise AuditError("a multi-label or segmentation audit over workers explains each "
                         "row's findings (--explain label, every row with a label or mask): "
                         "job messages take one class per image")
    return targets  # type: ignore[return-value]

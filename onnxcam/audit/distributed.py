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

from onnxcam.audit.backend import AuditRow, ExplainSettings, RowOutcome
from onnxcam.bundle import read_bundle
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
        pending: dict[str, list[AuditRow]] = {}
        iterator = iter(chunks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.in_flight:
                rows = next(iterator, None)
                if rows is None:
                    exhausted = True
                else:
                    pending[self._submit(rows, settings)] = rows
            finished = [job_id for job_id in pending
                        if celery_status(job_id, self.settings) in ("done", "failed")]
            if not finished:
                time.sleep(POLL_SECONDS)
            for job_id in finished:
                yield self._outcomes(job_id, pending.pop(job_id))

    def _submit(self, rows: list[AuditRow], settings: ExplainSettings) -> str:
        targets = [settings.target(row) for row in rows]
        job = submit(self.sha, [row.image for row in rows], settings.method,
                     [t if t >= 0 else None for t in targets], chunk_size=len(rows),
                     settings=self.settings,
                     faithfulness_steps=settings.steps if settings.faithfulness else 0)
        (job_id,) = job.ids
        return job_id

    def _outcomes(self, job_id: str, rows: list[AuditRow]) -> list[RowOutcome]:
        records = job_records(job_id, self.store)
        return [self._outcome(job_id, row, record) for row, record in zip(rows, records)]

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



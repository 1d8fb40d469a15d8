"""How long the store keeps jobs and bundles: ``onnxcam store prune`` and the
worker's ONNXCAM_RETENTION.

The rule: a job's folder goes, whole, when the job has ended (``summary.json`` or
``error.json``) and the newest object in it is older than the cut. A job that has
not ended (queued, running, or lost by a broker) is never removed, however old: its
worker may still write into it. With ``bundles``, a bundle goes when it is older than
the cut and no job that stays names it (in its request, summary or a record); when a
job that stays names none, no bundle goes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from onnxcam.worker.keys import (
    BUNDLE_PREFIX,
    ERROR,
    JOB_PREFIX,
    PRUNED_AT,
    RECORD_NAME,
    REQUEST,
    SUMMARY,
    job_key,
)
from onnxcam.worker.settings import Settings, load_settings
from onnxcam.worker.store import Store, classified, modified_time

log = logging.getLogger(__name__)

# ONNXCAM_RETENTION: the workers of a store prune it about this often, in all.
PRUNE_EVERY = 3600.0

@dataclass
class Folder:
    """One job's objects: path to size, and the newest modification time."""

    sizes: dict[str, int] = field(default_factory=dict)
    newest: float = 0.0

    def has(self, name: str) -> bool:
        return any(path.rsplit("/", 1)[-1] == name for path in self.sizes)


@dataclass
class Pruned:
    """What a prune removed (or, dry, would remove)."""

    jobs: list[str] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept_unfinished: int = 0  # jobs past the cut that have not ended: never removed
    kept_jobs: int = 0


def prune(store: Store, older_than: float, *, bundles: bool = False, dry_run: bool = False,
          now: float | None = None) -> Pruned:
    """Remove ended jobs (and, with ``bundles``, unused bundles) whose newest object is
    more than ``older_than`` seconds old, as the module's rule says."""
    cut = (time.time() if now is None else now) - older_than
    folders = _job_folders(store)
    pruned, doomed = Pruned(), list[str]()
    for job_id, folder in sorted(folders.items()):
        if folder.newest >= cut:
            pruned.kept_jobs += 1
        elif not (folder.has(SUMMARY) or folder.has(ERROR)):
            pruned.kept_jobs += 1
            pruned.kept_unfinished += 1
        else:
            pruned.jobs.append(job_id)
            pruned.bytes_freed += sum(folder.sizes.values())
            doomed.extend(folder.sizes)
    if bundles:
        removed = set(pruned.jobs)
        kept = [job_id for job_id in folders if job_id not in removed]
        for path, size in _unused_bundles(store, kept, cut).items():
            pruned.bundles.append(path.rsplit("/", 1)[-1].removesuffix(".onnx"))
            pruned.bytes_freed += size
            doomed.append(path)
    if doomed and not dry_run:
        _remove(store, pruned.jobs, doomed)
    log.info("pruned %d jobs and %d bundles (%d bytes)%s", len(pruned.jobs),
             len(pruned.bundles), pruned.bytes_freed, " (dry run)" if dry_run else "")
    return pruned


def _remove(store: Store, jobs: list[str], paths: list[str]) -> None:
    """Remove the jobs' folders and the objects at ``paths``: on S3 in bulk deletes;
    on disk a folder at a time (fsspec's one file at a time is ten times slower)."""
    with classified("prune"):
        if not store.local:
            store.fs.rm(paths)
            return
        for job_id in jobs:
            shutil.rmtree(store.path(f"{JOB_PREFIX}/{job_id}"), ignore_errors=True)
        for path in paths:
            if not path.startswith(store.path(JOB_PREFIX) + "/") and os.path.exists(path):
                os.remove(path)


def _listing(store: Store, prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under ``prefix``, path to fsspec info, in one (paged) listing."""
    with classified(prefix):
        if not store.fs.exists(store.path(prefix)):
            return {}
        found = store.fs.find(store.path(prefix), detail=True)
    return {str(path): info for path, info in found.items() if info.get("type") != "directory"}


def _job_folders(store: Store) -> dict[str, Folder]:
    folders: dict[str, Folder] = defaultdict(Folder)
    start = len(store.path(JOB_PREFIX)) + 1
    for path, info in _listing(store, JOB_PREFIX).items():
        job_id = path[start:].split("/", 1)[0]
        folder = folders[job_id]
        folder.sizes[path] = int(info.get("size") or 0)
        folder.newest = max(folder.newest, modified_time(info) or 0.0)
    return dict(folders)


def _unused_bundles(store: Store, kept_jobs: list[str], cut: float) -> dict[str, int]:
    """Bundles older than ``cut`` that none of ``kept_jobs`` names; none at all when a
    kept job names no bundle anywhere (it could be any)."""
    named = set()
    for job_id in kept_jobs:
        bundle = _bundle_of(store, job_id)
        if bundle is None:
            log.warning("job %s names no bundle: no bundle is pruned", job_id)
            return {}
        named.add(bundle)
    return {path: int(info.get("size") or 0)
            for path, info in _listing(store, BUNDLE_PREFIX).items()
            if path.rsplit("/", 1)[-1].removesuffix(".onnx") not in named
            and (modified_time(info) or 0.0) < cut}


def _bundle_of(store: Store, job_id: str) -> str | None:
    names = [REQUEST, SUMMARY]
    names += [name for name in store.names(job_key(job_id, "")) if RECORD_NAME.match(name)][:1]
    for name in names:
        data = store.find(job_key(job_id, name))
        try:
            bundle = json.loads(data).get("bundle") if data is not None else None
        except (ValueError, AttributeError):
            bundle = None
        if isinstance(bundle, str):
            return bundle
    return None


@functools.lru_cache(maxsize=1)
def _worker_state() -> tuple[Settings, Store]:
    settings = load_settings()
    return settings, Store(settings.store_url)


def after_job(**_: Any) -> None:
    """Celery's task_postrun, in the pool process once the job's result is out: with
    ONNXCAM_RETENTION set, prune the store when no worker has in the last hour
    (``retention.json`` says when one last did). Two workers at once may both prune;
    that only repeats the work. A failure is logged; the worker serves on."""
    settings, store = _worker_state()
    if settings.retention_seconds is None:
        return
    try:
        found = store.find(PRUNED_AT)
        last = float(json.loads(found)["at"]) if found else 0.0
        if time.time() - last < PRUNE_EVERY:
            return
        store.put(PRUNED_AT, json.dumps({"at": time.time()}).encode())
        prune(store, settings.retention_seconds, bundles=True)
    except Exception as exc:  # noqa: BLE001 - retention must never stop a worker
        log.error("pruning the store (ONNXCAM_RETENTION) failed: %s: %s",
                  type(exc).__name__, exc)

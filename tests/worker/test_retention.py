"""``onnxcam store prune``: which jobs and bundles go, the bytes freed, on a folder and
on S3 (moto's server). Ages are set by hand (os.utime), sizes written by hand."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from service import REDIS_HOST, free_port, start_moto

from onnxcam.cli import main
from onnxcam.worker.retention import prune
from onnxcam.worker.settings import parse_duration
from onnxcam.worker.store import Store

DAY = 86400.0
NOW = time.time()
OLD_SHA, USED_SHA, FRESH_SHA = "0a" * 32, "1b" * 32, "2c" * 32


def test_durations() -> None:
    assert [parse_duration(text) for text in ("45s", "30m", "12h", "7d", "2w", "1.5h")] == [
        45, 1800, 43200, 604800, 1209600, 5400]
    for bad in ("7", "d", "-1d", "7x", "", "7 days"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def write(root: Path, key: str, data: bytes, age_days: float) -> int:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    when = NOW - age_days * DAY
    os.utime(path, (when, when))
    return len(data)


def request(sha: str) -> bytes:
    return json.dumps({"v": 1, "bundle": sha, "images": [{"name": "a.png"}]}).encode()


@pytest.fixture
def store_folder(tmp_path: Path) -> tuple[Path, int]:
    """Jobs and bundles of known ages; returns the folder and the bytes that a 7-day
    prune with bundles frees, counted as written."""
    root = tmp_path / "store"
    freed = 0
    # ended 10 days ago: goes (a summary, and a failure)
    freed += write(root, "jobs/old-done/request.json", request(OLD_SHA), 12)
    freed += write(root, "jobs/old-done/00000.npy", b"x" * 1000, 10)
    freed += write(root, "jobs/old-done/00000.json", b'{"bundle": "%s"}' % OLD_SHA.encode(), 10)
    freed += write(root, "jobs/old-done/summary.json", b"{}", 10)
    freed += write(root, "jobs/old-failed/error.json", b'{"code": "x"}' * 3, 9)
    # never ended (queued or lost), 30 days old: stays
    write(root, "jobs/old-queued/request.json", request(USED_SHA), 30)
    write(root, "jobs/old-queued/starts.json", b'{"starts": 1}', 30)
    # ended, one file old and one new: the newest decides, it stays
    write(root, "jobs/touched/request.json", request(USED_SHA), 20)
    write(root, "jobs/touched/summary.json", b"{}", 1)
    # bundles: one only old jobs name, one a kept job names, one new and unnamed
    freed += write(root, f"bundles/{OLD_SHA}.onnx", b"o" * 300, 12)
    write(root, f"bundles/{USED_SHA}.onnx", b"u" * 300, 30)
    write(root, f"bundles/{FRESH_SHA}.onnx", b"f" * 300, 0.1)
    write(root, "inputs/upload.png", b"p" * 50, 40)  # not a job: never touched
    return root, freed


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_prune_removes_ended_jobs_past_the_cut(store_folder: tuple[Path, int]) -> None:
    root, freed = store_folder
    before = files(root)
    store = Store(str(root))
    dry = prune(store, 7 * DAY, bundles=True, dry_run=True)
    assert files(root) == before
    assert (dry.jobs, dry.bundles) == (["old-done", "old-failed"], [OLD_SHA])
    assert dry.bytes_freed == freed == 1000 + 2 + 39 + 300 + len(request(OLD_SHA)) + 78
    assert (dry.kept_jobs, dry.kept_unfinished) == (2, 1)

    done = prune(store, 7 * DAY, bundles=True)
    assert done == dry
    assert files(root) == [
        f"bundles/{USED_SHA}.onnx", f"bundles/{FRESH_SHA}.onnx", "inputs/upload.png",
        "jobs/old-queued/request.json", "jobs/old-queued/starts.json",
        "jobs/touched/request.json", "jobs/touched/summary.json"]
    assert sorted(p.name for p in (root / "jobs").iterdir()) == ["old-queued", "touched"]
    assert prune(store, 7 * DAY, bundles=True).bytes_freed == 0  # nothing more to do


def test_without_bundles_and_with_a_shorter_cut(store_folder: tuple[Path, int]) -> None:
    root, _ = store_folder
    pruned = prune(Store(str(root)), 12 * 3600)
    assert pruned.jobs == ["old-done", "old-failed", "touched"] and pruned.bundles == []
    assert (root / "bundles" / f"{OLD_SHA}.onnx").exists()
    assert (root / "jobs" / "old-queued").is_dir()


def test_a_kept_job_that_names_no_bundle_keeps_them_all(store_folder: tuple[Path, int]) -> None:
    root, _ = store_folder
    write(root, "jobs/anonymous/00000.npy", b"x", 0)  # sent without request.json, running
    pruned = prune(Store(str(root)), 7 * DAY, bundles=True)
    assert pruned.bundles == [] and pruned.jobs == ["old-done", "old-failed"]


def test_command(store_folder: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    root, freed = store_folder
    monkeypatch.setenv("ONNXCAM_STORE_URL", str(root))
    runner = CliRunner()
    shown = runner.invoke(main, ["store", "prune", "--older-than", "7d", "--bundles",
                                 "--dry-run"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == f"job old-done\njob old-failed\nbundle {OLD_SHA}\n"
    assert shown.stderr == (f"onnxcam: would remove 2 jobs and 1 bundle, {freed} bytes, from "
                            f"{root}; kept 2 jobs (1 not ended)\n")
    assert (root / "jobs" / "old-done").exists()
    removed = runner.invoke(main, ["store", "prune", "--older-than", "7d"])
    assert removed.exit_code == 0 and removed.stdout == "job old-done\njob old-failed\n"
    assert removed.stderr.startswith("onnxcam: removed 2 jobs, ")
    assert not (root / "jobs" / "old-done").exists()
    bad = runner.invoke(main, ["store", "prune", "--older-than", "a week"])
    assert bad.exit_code == 2 and "is not a duration" in bad.stderr


@pytest.fixture(scope="module")
def s3_store() -> Iterator[Store]:
    """An empty store on moto's S3 server, fsspec pointed at it for this module."""
    pytest.importorskip("s3fs")
    import fsspec.config
    import s3fs

    server = start_moto(free_port())
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in credentials.items():
            patch.setenv(name, value)
        patch.setitem(fsspec.config.conf, "s3",
                      {"endpoint_url": f"http://{REDIS_HOST}:{server.port}"})
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir("onnxcam-prune")
            yield Store("s3://onnxcam-prune/store")
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_prune_on_s3(s3_store: Store) -> None:
    """S3 objects cannot be back-dated: the cut is moved instead (``now`` an hour on)."""
    store = s3_store
    store.put("jobs/done/request.json", request(OLD_SHA))
    store.put("jobs/done/00000.npy", b"x" * 700)
    store.put("jobs/done/summary.json", b"{}")
    store.put("jobs/queued/request.json", request(USED_SHA))
    store.put(f"bundles/{OLD_SHA}.onnx", b"o" * 40)
    store.put(f"bundles/{USED_SHA}.onnx", b"u" * 40)
    assert prune(store, 3600).jobs == []  # all just written
    later = time.time() + 2 * 3600
    dry = prune(store, 3600, bundles=True, dry_run=True, now=later)
    assert (dry.jobs, dry.bundles) == (["done"], [OLD_SHA])
    assert dry.bytes_freed == len(request(OLD_SHA)) + 700 + 2 + 40
    assert store.exists("jobs/done/summary.json")
    assert prune(store, 3600, bundles=True, now=later) == dry
    assert store.names("jobs") == ["queued"]
    assert store.names("jobs/done") == []
    assert store.names("bundles") == [f"{USED_SHA}.onnx"]


def test_worker_retention_prunes_at_most_once_an_hour(
        store_folder: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNXCAM_RETENTION as Celery's task_postrun calls it in a worker process."""
    from celery.signals import task_postrun

    import onnxcam.worker.app  # noqa: F401 - the worker's app connects the signal
    from onnxcam.worker import retention

    root, _ = store_folder
    assert retention.after_job in [receiver for _, receiver in task_postrun.receivers]
    monkeypatch.setenv("ONNXCAM_STORE_URL", str(root))
    monkeypatch.setenv("ONNXCAM_RETENTION", "7d")
    retention._worker_state.cache_clear()
    try:
        retention.after_job(task_id="x")
        assert not (root / "jobs" / "old-done").exists()
        assert not (root / "bundles" / f"{OLD_SHA}.onnx").exists()
        assert (root / "jobs" / "old-queued").exists()
        write(root, "jobs/later/summary.json", b"{}", 10)
        retention.after_job(task_id="y")  # within the hour: no second prune
        assert (root / "jobs" / "later").exists()
        stamp = root / "retention.json"
        stamp.write_text(json.dumps({"at": NOW - 2 * 3600}))
        retention.after_job(task_id="z")
        assert not (root / "jobs" / "later").exists()
        monkeypatch.delenv("ONNXCAM_RETENTION")
        retention._worker_state.cache_clear()
        write(root, "jobs/unset/summary.json", b"{}", 10)
        stamp.unlink()
        retention.after_job(task_id="w")  # unset: never
        assert (root / "jobs" / "unset").exists()
    finally:
        retention._worker_state.cache_clear()


def test_celery_results_expire_as_set() -> None:
    from onnxcam.worker.app import make_app
    from onnxcam.worker.settings import load_settings

    assert make_app(load_settings()).conf.result_expires == DAY
    assert make_app(load_settings(result_expires=77)).conf.result_expires == 77

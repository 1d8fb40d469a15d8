"""Issue 20, attacks 4 and 7 and the targets and dropped jobs of 8: what a broker client
can do to other people's jobs. Signed messages, job ids bound to their request, sender
strings echoed at a bounded length, targets read as numbers only when they are ASCII
digits, and a dropped job reported to its sender.

The pure functions are checked against values computed here by hand; the attacks run
against real ``onnxcam worker`` processes and a real Redis (database 8)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from poison import QUEUE, envelope
from service import redis_url, service_env, settings_for, start_worker, wait_for

from onnxcam.bundle import read_bundle_info
from onnxcam.errors import (
    BadSignatureError,
    BadTargetError,
    DuplicateJobError,
    MalformedJobError,
    SettingsError,
)
from onnxcam.words import clipped
from onnxcam.worker.broker import _job_id_in_tail
from onnxcam.worker.client import Job, _app, celery_status, job_error, send, submit
from onnxcam.worker.message import ImageRef, JobSpec, parse_job
from onnxcam.worker.records import claim
from onnxcam.worker.settings import load_settings
from onnxcam.worker.signing import canonical, digest, sign, signed, verify
from onnxcam.worker.store import Store

KEY = b"0123456789abcdef-test-key"
OLD_KEY = b"fedcba9876543210-old-key"
SHA = "ab" * 32
JOB = {"v": 1, "bundle": SHA, "method": "gradcam",
       "images": [{"name": "\u00e9.png", "path": "/data/a.png"}], "targets": [None]}
# JOB under id "job-1", written out by hand: sorted keys, no spaces, ASCII escapes.
CANONICAL = ('{"body":{"bundle":"' + "ab" * 32 + '","images":[{"name":"\\u00e9.png",'
             '"path":"/data/a.png"}],"method":"gradcam","targets":[null],"v":1},'
             '"job":"job-1"}').encode("ascii")


# -- pure functions -----------------------------------------------------------------------


def test_canonical_digest_and_signature_against_hand_computed_values() -> None:
    assert canonical("job-1", JOB) == CANONICAL
    assert canonical("job-1", {**JOB, "sig": "anything"}) == CANONICAL  # the sig is left out
    assert digest("job-1", JOB) == hashlib.sha256(CANONICAL).hexdigest()
    assert sign("job-1", JOB, KEY) == hmac.new(KEY, CANONICAL, hashlib.sha256).hexdigest()
    # The wire's round trip (JSON out and in, keys in another order) keeps both.
    wire = json.loads(json.dumps(dict(reversed(list(JOB.items())))))
    assert digest("job-1", wire) == digest("job-1", JOB)


def test_verify_takes_only_a_signature_of_this_job_under_this_id() -> None:
    message = signed("job-1", JOB, KEY)
    assert message["sig"] == hmac.new(KEY, CANONICAL, hashlib.sha256).hexdigest()
    verify("job-1", message, [KEY])
    verify("job-1", signed("job-1", JOB, OLD_KEY), [KEY, OLD_KEY])  # keys rotating
    forged = {**JOB, "sig": sign("job-1", JOB, b"not-the-worker-key-at-all")}
    altered = {**message, "images": [{"name": "b", "path": "/data/secret.png"}]}
    for job_id, body in [("job-1", JOB), ("job-1", forged), ("job-1", altered),
                         ("job-2", message), ("job-1", {**JOB, "sig": "\u00e9" * 64}),
                         ("job-1", [message])]:
        with pytest.raises(BadSignatureError) as caught:
            verify(job_id, body, [KEY])
        assert KEY.decode() not in str(caught.value)


def test_signing_keys_are_long_and_never_shown() -> None:
    keys = load_settings(signing_key=f" {KEY.decode()}, {OLD_KEY.decode()} ").signing_keys
    assert keys == (KEY, OLD_KEY)
    assert load_settings().signing_keys == ()
    with pytest.raises(SettingsError, match="ONNXCAM_SIGNING_KEY: .*16 characters") as caught:
        load_settings(signing_key=f"{KEY.decode()},short-secret")
    assert "short-secret" not in str(caught.value)
    assert KEY.decode() not in repr(load_settings(signing_key=KEY.decode()))


def test_a_claimed_id_stays_with_its_request(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    first, second = digest("job-1", JOB), digest("job-1", {**JOB, "method": "eigencam"})
    claim(store, "job-1", first)
    claim(store, "job-1", first)  # the same request again: a redelivery
    with pytest.raises(DuplicateJobError, match="job-1 belongs to another request"):
        claim(store, "job-1", second)
    assert store.get("jobs/job-1/request.sha256") == first.encode()
    assert store.names("jobs/job-1/") == ["request.sha256"]
    assert [store.create("jobs/job-2/x", data) for data in (b"a", b"b")] == [True, False]
    assert store.get("jobs/job-2/x") == b"a"


def test_clipped_keeps_both_ends_within_the_limit() -> None:
    text = "a" * 150 + "m" * 10_000_000 + "z" * 150
    cut = clipped(text)
    assert len(cut) < 260 and cut.startswith("a" * 100) and cut.endswith("z" * 100)
    assert "10000100 characters cut" in cut
    assert clipped("short") == "short"


@pytest.mark.parametrize("targets", [0, {}, "", False, "cat", [None, None]])
def test_targets_other_than_a_list_or_null_are_malformed(targets: Any) -> None:
    with pytest.raises(MalformedJobError, match="targets"):
        parse_job({**JOB, "targets": targets}, "job-1")


def test_null_absent_or_empty_targets_mean_top_1() -> None:
    body = {key: value for key, value in JOB.items() if key != "targets"}
    for message in (body, {**body, "targets": None}, {**body, "targets": []}):
        assert parse_job(message, "job-1").targets == [None]
    assert parse_job({**JOB, "targets": ["\u00b2"]}, "job-1").targets == ["\u00b2"]


def test_only_ascii_digits_make_a_class_number(cnn_bundle: Path) -> None:
    info = read_bundle_info(cnn_bundle)
    assert [info.class_index(t) for t in ("1", " 4 ", "fox", 2)] == [1, 4, 2, 2]
    for target in ("\u00b2", "\u0661", "\uff13", "1_0", "-1", "5"):  # ², Arabic 1, fullwidth 3
        with pytest.raises(BadTargetError):
            info.class_index(target)
    labelled = dataclasses.replace(info, labels=["0", "\u00b2", "\u0661", "c", "d"])
    assert [labelled.class_index(t) for t in ("\u00b2", "\u0661", "0", "4")] == [1, 2, 0, 4]


def test_the_job_id_of_an_item_too_large_to_parse_is_read_from_its_tail() -> None:
    item = json.dumps(envelope({"v": 1, "pad": "A" * 200_000}, "job-too-large"))
    assert _job_id_in_tail(item) == "job-too-large"
    assert _job_id_in_tail(item[:-70_000]) is None  # headers cut off: nothing to report
    other = envelope({}, "job-x")
    other["headers"]["task"] = "another.task"
    assert _job_id_in_tail(json.dumps(other)) is None
    other["headers"].update(task="onnxcam.explain", id="../../etc")
    assert _job_id_in_tail(json.dumps(other)) is None


# -- against a real worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("trust")
    root = folder / "images"
    root.mkdir()
    rng = np.random.default_rng(20)
    for name in ("good", "other"):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            root / f"{name}.png")
    env = service_env(redis_url(8), folder / "store", root)
    return {"folder": folder, "root": root, "env": env, "settings": settings_for(env)}


def _redis(settings: Any) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url)


def _job(sha: str, root: Path, image: str, target: Any = None, **fields: Any) -> dict:
    return {"v": 1, "bundle": sha, "method": "gradcam", "targets": [target],
            "images": [{"name": image, "path": str(root / image)}], **fields}


def _settled(client: Any) -> None:
    wait_for(lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0, 60,
             "the queue to empty")


def _ended(job_id: str, settings: Any) -> bool:
    return celery_status(job_id, settings) in ("done", "failed")


def _serves_a_good_job(deployment: dict, bundle: Path, settings: Any = None) -> None:
    records = submit(bundle, [deployment["root"] / "good.png"],
                     settings=settings or deployment["settings"]).wait(timeout=60)
    assert records[0]["status"] == "ok", records


def _folder(store: Store, job_id: str) -> dict[str, bytes]:
    return {name: store.get(f"jobs/{job_id}/{name}") for name in store.names(f"jobs/{job_id}/")}


@pytest.fixture(scope="module")
def worker(deployment: dict[str, Any]) -> Any:
    """A worker without a key, for the tests that take it; the first test of the module
    runs before it and the last stops it, as both need the queue to themselves."""
    process = start_worker("trust", deployment["env"], deployment["folder"], concurrency=1)
    process.wait_ready()
    yield process
    process.stop()


@pytest.mark.slow
def test_a_squatted_queued_id_keeps_its_own_result(deployment: dict, cnn_bundle: Path) -> None:
    """Attack 4: an attacker reads a queued job's id and pushes its own job under it, to
    run first. The victim's result is its own; the attacker's is refused as duplicate_job
    and leaves nothing in the victim's folder, nor in Celery's state."""
    settings, root = deployment["settings"], deployment["root"]
    store, client = Store(settings.store_url), _redis(settings)
    victim = submit(cnn_bundle, [root / "good.png"], settings=settings).ids[0]
    sha = json.loads(store.get(f"jobs/{victim}/request.json"))["bundle"]
    client.rpush(QUEUE, json.dumps(envelope(_job(sha, root, "other.png", 4), victim)))
    worker = start_worker("squatted", deployment["env"], deployment["folder"])
    try:
        worker.wait_ready()
        (record,) = Job([victim], settings).wait(timeout=60)
        _settled(client)
        _serves_a_good_job(deployment, cnn_bundle)
    finally:
        worker.stop()
    assert record["image"] == "good.png" and record["status"] == "ok"
    top1 = record["top"][0]["class"]
    assert record["target"] == top1  # the victim asked for top-1, the attacker for 4
    assert celery_status(victim, settings) == "done"
    assert sorted(_folder(store, victim)) == [
        "00000.json", "00000.npy", "00000.png", "00000.raw.npy", "request.json",
        "request.sha256", "starts.json", "summary.json"]
    assert json.loads(store.get(f"jobs/{victim}/starts.json")) == {"starts": 1}
    assert "other.png" not in json.dumps(json.loads(store.get(f"jobs/{victim}/summary.json")))
    log = worker.text()
    assert f"job {victim} refused: duplicate_job" in log and "Traceback" not in log


@pytest.mark.slow
def test_a_finished_id_reused_changes_nothing(deployment: dict, cnn_bundle: Path,
                                              worker: Any) -> None:
    """Attack 4, reuse: another request under a finished job's id, one that would run
    and one that would fail. Neither runs: the folder's bytes and the state stay."""
    settings, root = deployment["settings"], deployment["root"]
    store, client = Store(settings.store_url), _redis(settings)
    finished = submit(cnn_bundle, [root / "good.png"], settings=settings)
    finished.wait(timeout=60)
    job_id = finished.ids[0]
    before = _folder(store, job_id)
    sha = json.loads(before["request.json"])["bundle"]
    lines = worker.text().count(f"job {job_id} refused: duplicate_job")
    for job in (_job(sha, root, "other.png", 2), _job(sha, root, "other.png", method="nope"),
                {"v": 99}):
        client.lpush(QUEUE, json.dumps(envelope(job, job_id)))
    wait_for(lambda: worker.text().count(f"job {job_id} refused: duplicate_job") == lines + 3,
             30, "three refusals")
    _settled(client)
    assert _folder(store, job_id) == before  # no error.json, no starts, no records
    assert celery_status(job_id, settings) == "done"
    assert finished.wait(timeout=5)[0]["image"] == "good.png"
    _serves_a_good_job(deployment, cnn_bundle)


@pytest.mark.slow
def test_ten_jobs_with_10_mb_fields_leave_a_few_kb(deployment: dict, cnn_bundle: Path,
                                                   worker: Any) -> None:
    """Attack 7: 10 MB in method, bundle and v was written back whole into error.json,
    Celery's result (512 MB in Redis for ten jobs) and the log (750 MB). Now each echo is
    clipped: a few KB in all."""
    settings, root = deployment["settings"], deployment["root"]
    store, client = Store(settings.store_url), _redis(settings)
    sha = store.put_bundle(cnn_bundle.read_bytes())
    _settled(client)
    redis_before = _redis_bytes(client)
    log_before = worker.log.stat().st_size
    big, ids, fields = "x" * (10 * 2**20), [], ("v", "bundle", "method")
    for index in range(10):
        item = envelope(_job(sha, root, "good.png", **{fields[index % 3]: big}))
        ids.append(item["headers"]["id"])
        client.lpush(QUEUE, json.dumps(item))
    del big, item
    wait_for(lambda: all(_ended(job_id, settings) for job_id in ids), 120, "the ten jobs")
    _settled(client)
    codes = [job_error(job_id, store)["code"] for job_id in ids]  # type: ignore[index]
    assert codes == [("malformed_job", "unknown_bundle", "bad_method")[i % 3]
                     for i in range(10)]
    grown_redis = _redis_bytes(client) - redis_before
    grown_log = worker.log.stat().st_size - log_before
    error_bytes = [len(store.get(f"jobs/{job_id}/error.json")) for job_id in ids]
    print(f"ten 10 MB echoes: Redis +{grown_redis} bytes, log +{grown_log} bytes, "
          f"error.json {max(error_bytes)} bytes at most")
    assert grown_redis < 64 * 1024 and grown_log < 64 * 1024 and max(error_bytes) < 1024
    _serves_a_good_job(deployment, cnn_bundle)


def _redis_bytes(client: Any) -> int:
    return sum(client.memory_usage(key) or 0 for key in client.scan_iter())


@pytest.mark.slow
def test_targets_on_a_worker(deployment: dict, cnn_bundle: Path, worker: Any) -> None:
    """"²" failed the whole job with a bare ValueError and "١" was read as class 1; now
    both are labels the bundle lacks, ending their image only. A targets field that is
    no list is malformed_job, where 0, {}, "" and false passed as "none"."""
    settings, root = deployment["settings"], deployment["root"]
    image = root / "good.png"
    job = submit(cnn_bundle, [image] * 4, targets=["\u00b2", "\u0661", 1, "fox"],
                 settings=settings)
    records = job.wait(timeout=60)
    assert [(r["error"]["code"] if r["status"] == "error" else r["target"]) for r in records] \
        == ["bad_target", "bad_target", 1, 2]
    assert "no class labelled '\u0661'" in records[1]["error"]["message"]
    sha = Store(settings.store_url).put_bundle(cnn_bundle.read_bytes())
    client, ids = _redis(settings), []
    for targets in (0, {}, "", False):
        item = envelope({**_job(sha, root, "good.png"), "targets": targets})
        ids.append(item["headers"]["id"])
        client.lpush(QUEUE, json.dumps(item))
    wait_for(lambda: all(_ended(job_id, settings) for job_id in ids), 60, "the four jobs")
    store = Store(settings.store_url)
    assert [job_error(job_id, store)["code"] for job_id in ids] == ["malformed_job"] * 4  # type: ignore[index]
    _serves_a_good_job(deployment, cnn_bundle)


@pytest.mark.slow
def test_a_job_dropped_as_oversized_is_reported(deployment: dict, cnn_bundle: Path,
                                                worker: Any) -> None:
    """A job too large for any worker was dropped unread, and its sender waited at
    PENDING forever. Now its id, read from the item's tail, gets a FAILURE with code
    rejected in Celery's backend; nothing is written into its folder by the worker."""
    settings = deployment["settings"]
    store = Store(settings.store_url)
    sha = store.put_bundle(cnn_bundle.read_bytes())
    spec = JobSpec("job-oversized", sha, [ImageRef("big.png", data=os.urandom(30 * 2**20))],
                   "gradcam", [None])
    send(_app(settings), spec, store)
    del spec
    wait_for(lambda: celery_status("job-oversized", settings) == "failed", 60,
             "the oversized job to fail")
    error = job_error("job-oversized", store, settings)
    assert error is not None and error["code"] == "rejected"
    assert "a queue item of" in error["message"] and "another store" not in error["message"]
    (record,) = Job(["job-oversized"], settings).wait(timeout=5)
    assert record["error"]["code"] == "rejected"
    assert sorted(store.names("jobs/job-oversized/")) == ["request.json", "request.sha256"]
    assert "dropped a broker message of job job-oversized" in worker.text()
    _serves_a_good_job(deployment, cnn_bundle)


@pytest.mark.slow
def test_a_worker_with_a_key_takes_only_signed_jobs(deployment: dict, cnn_bundle: Path,
                                                    worker: Any) -> None:
    """With ONNXCAM_SIGNING_KEY set, an unsigned job, one signed with another key, a
    signed one whose body was changed and a signed one replayed under another id are
    refused (bad_signature, as the id's state) before anything is stored; a job signed
    with an older key of the list, and every job the client signs, run."""
    worker.stop()  # the keyless worker would run the unsigned jobs
    keys = f"{KEY.decode()},{OLD_KEY.decode()}"
    env = {**deployment["env"], "ONNXCAM_SIGNING_KEY": keys}
    settings, root = settings_for(env), deployment["root"]
    store, client = Store(settings.store_url), _redis(settings)
    sha = store.put_bundle(cnn_bundle.read_bytes())
    good = _job(sha, root, "good.png")
    stolen = signed("job-signed", good, KEY)
    bodies = {
        "job-unsigned": good,
        "job-forged": signed("job-forged", good, b"a-key-the-worker-does-not-hold"),
        "job-signed": {**stolen, "images": [{"name": "x", "path": str(root / "other.png")}]},
        "job-replayed": stolen,
        "job-old-key": signed("job-old-key", good, OLD_KEY),
    }
    for job_id, body in bodies.items():
        client.lpush(QUEUE, json.dumps(envelope(body, job_id)))
    worker = start_worker("signed", env, deployment["folder"])
    try:
        worker.wait_ready()
        started = time.monotonic()
        for job_id in bodies:
            wait_for(lambda job_id=job_id: _ended(job_id, settings), 60, f"{job_id} to end")
        _serves_a_good_job(deployment, cnn_bundle, settings)
        took = time.monotonic() - started
    finally:
        worker.stop()
    for job_id in ("job-unsigned", "job-forged", "job-signed", "job-replayed"):
        error = job_error(job_id, store, settings)
        assert error is not None and error["code"] == "bad_signature", (job_id, error)
        assert store.names(f"jobs/{job_id}/") == [], job_id
    assert celery_status("job-old-key", settings) == "done"
    log = worker.text()
    assert log.count("refused: bad_signature") == 4 and "Traceback" not in log
    assert KEY.decode() not in log and OLD_KEY.decode() not in log
    assert took < 30

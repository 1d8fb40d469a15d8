"""The audit fanned out to real ``onnxcam worker`` processes through a real Redis:
the same numbers as in-process, and a worker killed mid-chunk loses nothing."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service import redis_url, service_env, start_worker, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shortcut"
NUMBERS = ("score", "energy_in_box", "box_area")
SAME = ("image", "label", "pred", "correct", "pointing_hit", "status", "error", "explained")


def audit(*args: str | Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxcam.cli", "audit", *map(str, args)],
                            env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, timeout: float = 180) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def assert_same_results(local: list[dict[str, str]], remote: list[dict[str, str]]) -> None:
    assert len(local) == len(remote)
    for mine, theirs in zip(local, remote):
        assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}
        for key in NUMBERS:
            if mine[key] or theirs[key]:
                assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=1e-5), key


def test_distributed_audit_gives_the_local_numbers(tmp_path: Path) -> None:
    env = service_env(redis_url(13), tmp_path / "store", EXAMPLE)
    manifest, model = EXAMPLE / "manifest.csv", EXAMPLE / "model.onnx"
    local = audit(manifest, "--model", model, "--out", tmp_path / "local", env=env)
    finished(local)
    worker = start_worker("auditor", env, tmp_path, concurrency=2)
    try:
        worker.wait_ready()
        remote = audit(manifest, "--model", model, "--out", tmp_path / "remote",
                       "--broker", env["ONNXCAM_BROKER_URL"], "--chunk-size", "7", env=env)
        stdout = finished(remote)
    finally:
        worker.stop()
    assert "flag: bus: attention mostly outside the object" in stdout
    assert_same_results(rows(tmp_path / "local"), rows(tmp_path / "remote"))
    for row in rows(tmp_path / "remote"):
        raw = np.load(row["heatmap"])  # the workers' raw map in the store
        assert raw.ndim == 2 and raw.dtype == np.float32
    assert (tmp_path / "remote" / "report.html").stat().st_size > 10_000
    # The strategy clusters read the workers' maps from the store and find the local ones.
    local_clusters, remote_clusters = (
        {label: (found["k"], found["empty"], [c["members"] for c in found["clusters"]])
         for label, found in json.loads((tmp_path / side / "summary.json").read_text())
         ["clusters"]["per_class"].items()} for side in ("local", "remote"))
    assert local_clusters == remote_clusters and set(local_clusters) == {"bus", "car"}


def test_worker_killed_mid_chunk_still_completes(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    gradient = np.linspace(0, 255, 1200 * 1200, dtype=np.float32).reshape(1200, 1200)
    lines = ["image,label,bbox"]
    for index in range(16):
        pixels = np.roll(gradient, 70 * index, axis=1).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{index:02d}.png",
                                                    compress_level=1)
        lines.append(f"images/{index:02d}.png,{'bus' if index % 2 else 'car'},100 200 700 900")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    env = service_env(redis_url(14), tmp_path / "store", folder, visibility_timeout="4")
    model = EXAMPLE / "model.onnx"
    finished(audit(manifest, "--model", model, "--out", tmp_path / "local", env=env))

    doomed = start_worker("doomed", env, tmp_path)
    doomed.wait_ready()
    remote = audit(manifest, "--model", model, "--out", tmp_path / "remote", "--broker",
                   env["ONNXCAM_BROKER_URL"], "--chunk-size", "8", env=env)
    jobs = tmp_path / "store" / "jobs"
    wait_for(lambda: any(jobs.glob("*/00001.json")), 120, "a chunk to be under way")
    doomed.kill_group()
    rescuer = start_worker("rescuer", env, tmp_path)
    try:
        rescuer.wait_ready()
        finished(remote)
    finally:
        rescuer.stop()
    results = rows(tmp_path / "remote")
    assert [r["status"] for r in results] == ["ok"] * 16
    assert_same_results(rows(tmp_path / "local"), results)
    started = set(re.findall(r"job ([0-9a-f-]{36}): \d+ images", doomed.text()))
    assert started & set(re.findall(r"job ([0-9a-f-]{36}): \d+ images", rescuer.text())), \
        "no chunk the killed worker had taken was finished by the other"

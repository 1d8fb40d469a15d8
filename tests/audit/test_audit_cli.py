"""``onnxcam audit`` through click's CliRunner, and real processes killed mid-audit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import manifest_rows, write_manifest

from onnxcam.audit import LocalBackend
from onnxcam.audit.backend import AuditRow, ExplainSettings, RowOutcome
from onnxcam.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["audit", *map(str, args)])


@pytest.fixture
def manifest(tmp_path: Path, image_folder: Path) -> Path:
    return write_manifest(tmp_path / "m.csv", manifest_rows(image_folder, 12))


def test_audit_writes_its_outputs_and_prints_a_summary(tmp_path: Path, manifest: Path,
                                                       audit_bundle: Path) -> None:
    out = tmp_path / "out"
    result = run(manifest, "--model", audit_bundle, "--out", out, "--min-boxes", "1",
                 "--flag-energy", "0.99", "--chunk-size", "5")
    assert result.exit_code == 0, result.output
    assert "audited 12 rows (0 errors)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds"] == {"flag_energy": 0.99, "flag_lift": 1.5, "min_boxes": 1}
    flagged = [flag["class"] for flag in summary["flags"]]
    assert flagged and all(f"flag: {label}: " in result.stdout for label in flagged)
    assert "rows/s" in result.stderr and "12/12" in result.stderr
    assert len((out / "results.csv").read_text().splitlines()) == 13


def test_existing_results_without_resume_exit_2(tmp_path: Path, manifest: Path,
                                                audit_bundle: Path) -> None:
    out = tmp_path / "out"
    assert run(manifest, "--model", audit_bundle, "--out", out).exit_code == 0
    result = run(manifest, "--model", audit_bundle, "--out", out)
    assert result.exit_code == 2
    assert "pass --resume" in result.stderr
    assert run(manifest, "--model", audit_bundle, "--out", out, "--resume").exit_code == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--model", "missing.onnx"], "cannot read the bundle"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, manifest: Path, audit_bundle: Path,
                                         args: list[str], message: str) -> None:
    result = run(manifest, "--model", audit_bundle, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_audit_where_every_row_failed_exits_2(tmp_path: Path, audit_bundle: Path,
                                                  image_folder: Path) -> None:
    """Issue 12: 60 rows, every one an error, and the audit exited 0."""
    rows = [[str(tmp_path / f"gone{i}.png"), "cat", ""] for i in range(3)]
    rows.append([str(tmp_path / "broken.png"), "dog", ""])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = write_manifest(tmp_path / "m.csv", rows)
    result = run(manifest, "--model", audit_bundle, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "audited 4 rows (4 errors)" in result.stdout
    assert "every row failed (missing_image x3, bad_image x1)" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["error_codes"] == {"missing_image": 3, "bad_image": 1}
    # one good row among them: an audit with some errors, which still passes
    good = write_manifest(tmp_path / "good.csv", [*rows, *manifest_rows(image_folder, 1)])
    result = run(good, "--model", audit_bundle, "--out", tmp_path / "good")
    assert result.exit_code == 0 and "audited 5 rows (4 errors)" in result.stdout


def test_a_file_that_is_no_manifest_exits_2(tmp_path: Path, audit_bundle: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,cat\n")
    result = run(bad, "--model", audit_bundle, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no 'image' column" in result.stderr


def test_ctrl_c_exits_130_and_says_how_to_resume(
        tmp_path: Path, manifest: Path, audit_bundle: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = LocalBackend.run

    def interrupted(self: LocalBackend, chunks: Iterable[list[AuditRow]],
                    settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        for count, outcomes in enumerate(original(self, chunks, settings)):
            if count == 1:
                raise KeyboardInterrupt
            yield outcomes

    monkeypatch.setattr(LocalBackend, "run", interrupted)
    out = tmp_path / "out"
    result = run(manifest, "--model", audit_bundle, "--out", out, "--chunk-size", "4")
    assert result.exit_code == 130
    assert "--resume" in result.stderr
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4


def test_unreachable_broker_is_one_clear_error(tmp_path: Path, manifest: Path,
                                               audit_bundle: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from service import free_port

    monkeypatch.setenv("ONNXCAM_STORE_URL", str(tmp_path / "store"))
    result = run(manifest, "--model", audit_bundle, "--out", tmp_path / "o",
                 "--broker", f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("onnxcam: error: cannot reach the broker")


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "onnxcam.cli", "audit", *map(str, args)]


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_audit_then_resume_equals_an_uninterrupted_run(
        tmp_path: Path, image_folder: Path, audit_bundle: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", manifest_rows(image_folder, 1500))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole"
    subprocess.run(cli(manifest, "--model", audit_bundle, "--out", whole, "--chunk-size", "8"),
                   check=True, env=env, capture_output=True, cwd=ROOT)
    out = tmp_path / "out"
    process = subprocess.Popen(cli(manifest, "--model", audit_bundle, "--out", out,
                                   "--chunk-size", "8"), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while lines(out / "results.csv") < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = lines(out / "results.csv")
    assert 200 <= killed_at < 1501, "the audit finished before it could be killed"
    subprocess.run(cli(manifest, "--model", audit_bundle, "--out", out, "--chunk-size", "8",
                       "--resume"), check=True, env=env, capture_output=True, cwd=ROOT)
    assert (out / "results.csv").read_bytes() == (whole / "results.csv").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_after"] >= killed_at - 2 and summary["n"] == 1500


@pytest.mark.parametrize(("count", "wanted"), [(1, "audited 1 row (1 error)"),
                                               (2, "audited 2 rows (2 errors)")])
def test_the_audit_line_counts_agree(tmp_path: Path, audit_bundle: Path, count: int,
                                     wanted: str) -> None:
    rows = [[str(tmp_path / f"gone{i}.png"), "cat", ""] for i in range(count)]
    result = run(write_manifest(tmp_path / "m.csv", rows), "--model", audit_bundle,
                 "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output  # every row failed
    assert result.stdout.startswith(f"{wanted}, accuracy n/a; wrote ")

"""What a worker opens, as the kernel sees it. onnxruntime opens files from C++, where
the fuzz tests' audit hook (PEP 578, Python's opens only) sees nothing, so these tests
run the worker, and the library, under strace and read every open(2) of the process
tree while a bundle that names a file beside the worker as its weights is refused.

The first test shows the trace catching the leak: onnxruntime itself, given the same
bundle by path, opens the file. (Given bytes, as the engine gives it, onnxruntime 1.31
reads such a weight from its working folder only with graph optimisations off, and
fails before opening anything with them on; ``read_bundle``'s refusal does not lean on
either, and these tests hold whichever way a later onnxruntime goes.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_bundles import reading_outside
from PIL import Image
from service import free_port, service_env, settings_for, start_redis, start_worker, wait_for

from onnxcam.worker.client import _app, submit
from onnxcam.worker.store import Store

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")]
SECRET = "credentials"


def strace(trace: Path) -> tuple[str, ...]:
    """Follow forks, note every way a path is opened, in ``trace``."""
    return (str(shutil.which("strace")), "-f", "-qq", "-e", "trace=open,openat,openat2",
            "-o", str(trace))


def opens_of(trace: Path, name: str) -> list[str]:
    """The traced open calls whose path ends in ``name``, failed ones included."""
    return [line for line in trace.read_text(errors="replace").splitlines()
            if "open" in line and (f'/{name}"' in line or f'"{name}"' in line)]


@pytest.fixture
def hostile(tmp_path: Path, cnn_bundle: Path) -> Path:
    """A folder holding the secret and a bundle whose smallest weight is that file."""
    data, length = reading_outside(cnn_bundle, SECRET)
    (tmp_path / SECRET).write_bytes(b"aws_secret_access_key=" + b"k" * length)
    (tmp_path / "hostile.onnx").write_bytes(data)
    return tmp_path


def run_traced(code: str, folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    trace = folder / "trace.txt"
    done = subprocess.run([*strace(trace), sys.executable, "-c", code], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    return done, trace


def test_the_trace_sees_onnxruntime_read_external_data(hostile: Path) -> None:
    done, trace = run_traced(
        "import onnxruntime as ort; ort.InferenceSession('hostile.onnx', "
        "providers=['CPUExecutionProvider'])", hostile)
    assert done.returncode == 0, done.stderr
    assert opens_of(trace, SECRET), "onnxruntime read the weight from the file it names"


def test_the_library_refuses_without_opening(hostile: Path) -> None:
    done, trace = run_traced(
        "from onnxcam import Explainer\n"
        "from onnxcam.errors import BundleError\n"
        "try:\n    Explainer('hostile.onnx', device='cpu')\n"
        "except BundleError as error:\n    print(error.code)\n", hostile)
    assert done.stdout.strip() == "bad_bundle", done.stderr
    assert opens_of(trace, SECRET) == []


def test_a_traced_worker_never_opens_the_file(hostile: Path, cnn_bundle: Path) -> None:
    """A real worker, cwd beside the secret (as /data in the Docker image), a private
    Redis: the hostile job fails as bad_bundle, a good job after it succeeds, and no
    process of the worker's tree ever opened the secret."""
    images = hostile / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 40, 90)).save(images / "ok.png")
    redis = start_redis(hostile, free_port())
    env = service_env(f"redis://127.0.0.1:{redis.port}/0", hostile / "store", images)
    settings = settings_for(env)
    store = Store(settings.store_url)
    trace = hostile / "worker-trace.txt"
    worker = start_worker("traced", env, hostile, wrapper=strace(trace))
    try:
        worker.wait_ready(timeout=120)
        sha = store.put_bundle((hostile / "hostile.onnx").read_bytes())
        message = {"v": 1, "job": "leak", "bundle": sha, "method": "gradcam",
                   "images": [{"path": str(images / "ok.png")}], "targets": [None]}
        _app(settings).send_task("onnxcam.explain", args=[message], task_id="leak")
        wait_for(lambda: store.exists("jobs/leak/error.json"), 60, "the hostile job to fail")
        assert json.loads(store.get("jobs/leak/error.json"))["code"] == "bad_bundle"
        (record,) = submit(cnn_bundle, [images / "ok.png"], settings=settings).wait(timeout=60)
        assert record["status"] == "ok"
    finally:
        worker.stop()
        redis.stop()
    assert "trace=" not in worker.text()  # strace ran the worker, not an error
    assert opens_of(trace, "ok.png"), "the trace follows the pool process"
    assert opens_of(trace, SECRET) == []

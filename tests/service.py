"""Real parts for the service tests: a Redis database, `onnxcam worker` processes,
moto's S3 server. Nothing here is mocked; each helper starts or talks to a real
process on loopback and cleans up after itself."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from onnxcam.worker.settings import Settings

REDIS_HOST = "127.0.0.1"
# Another port keeps runs that share a machine (and Redis's numbered databases) apart.
REDIS_PORT = int(os.environ.get("REDIS_TEST_PORT", "6379"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


def redis_url(db: int, port: int = REDIS_PORT) -> str:
    """A Redis database for one test module, emptied; skips when no Redis answers."""
    import redis

    from onnxcam.worker.lost import CLOCK_SKEW

    client = redis.Redis(host=REDIS_HOST, port=port, db=db, socket_connect_timeout=1)
    try:
        client.flushdb()
        uptime = float(client.info("server")["uptime_in_seconds"])
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis server at {REDIS_HOST}:{port}")
    # A job whose request is older than the Redis it waits in, give or take the clock
    # skew allowed, was lost with an earlier Redis (``worker.lost``). These tests
    # assume a Redis older than that: a test process's own, just started, waits.
    time.sleep(max(CLOCK_SKEW + 1 - uptime, 0.0))
    return f"redis://{REDIS_HOST}:{port}/{db}"


def service_env(broker_url: str, store: Path, roots: Path, **extra: str) -> dict[str, str]:
    """The ONNXCAM_* variables of a test deployment: CPU workers, images by path."""
    return {"ONNXCAM_BROKER_URL": broker_url, "ONNXCAM_STORE_URL": str(store),
            "ONNXCAM_ALLOWED_ROOTS": str(roots), "ONNXCAM_INLINE_MAX_BYTES": "0",
            "ONNXCAM_DEVICE": "cpu", **{f"ONNXCAM_{k.upper()}": v for k, v in extra.items()}}


def settings_for(env: Mapping[str, str]) -> Settings:
    """What a client in ``env`` would read."""
    from onnxcam.worker.settings import load_settings

    return load_settings(**{k[len("ONNXCAM_"):].lower(): v for k, v in env.items()
                            if k.startswith("ONNXCAM_")})


def console() -> list[str]:
    """The installed ``onnxcam`` console script, or the module when it is not installed."""
    path = shutil.which("onnxcam")
    return [path] if path else [sys.executable, "-m", "onnxcam.cli"]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_noise_images(root: Path, count: int, side: int = 16, seed: int = 5) -> list[Path]:
    """``count`` RGB PNGs of seeded noise, ``img0.png``, ``img1.png``, ... in ``root``."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        paths.append(root / f"img{index}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def write_big_images(root: Path, count: int) -> list[Path]:
    """``count`` 1500x1500 PNGs (a shifted gradient each) in ``root``: storing their maps
    takes seconds in all, so that a job of them is caught mid-way."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    gradient = np.linspace(0, 255, 1500 * 1500, dtype=np.float32).reshape(1500, 1500)
    paths = []
    for index in range(count):
        path = root / f"big{index:02d}.png"
        Image.fromarray(np.roll(gradient, 50 * index, axis=1).astype(np.uint8)).convert(
            "RGB").save(path, compress_level=1)
        paths.append(path)
    return paths


@dataclass
class WorkerProcess:
    """An ``onnxcam worker`` in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.text()}")
            return " ready." in self.text()

        wait_for(ready, timeout, f"worker {self.name} to be ready")

    def kill_group(self) -> None:
        """SIGKILL the worker and every child it forked, as a crash or an OOM kill would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill_group()


def start_worker(name: str, env: Mapping[str, str], folder: Path, concurrency: int = 1,
                 extra: tuple[str, ...] = (), wrapper: tuple[str, ...] = ()) -> WorkerProcess:
    """``wrapper`` runs before the command (``strace -f -o ...``)."""
    log = folder / f"{name}.log"
    stream = log.open("wb")
    process = subprocess.Popen(
        [*wrapper, *console(), "worker", "--concurrency", str(concurrency), "--hostname",
         f"{name}@%h", *extra],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=stream,
        stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
    )
    stream.close()
    return WorkerProcess(name, process, log)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(folder: Path, port: int, aof: bool = True) -> ServerProcess:
    """A private redis-server keeping its files in ``folder``: with AOF on (fsync
    always), or with no persistence at all, so that a restart starts it empty."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else \
        ["--appendonly", "no"]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", REDIS_HOST, "--dir", str(folder),
         *persistence, "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = ServerProcess(process, port)
    wait_for(lambda: _answers(port), 10, f"redis-server on port {port}")
    return server


def start_moto(port: int) -> ServerProcess:
    """moto's standalone S3 server on loopback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", REDIS_HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = ServerProcess(process, port)
    wait_for(lambda: _answers(port), 30, f"moto server on port {port}")
    return server


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def make_tls_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    paths = {name: folder / f"{name}" for name in ("ca.key", "ca.crt", "server.key",
                                                   "server.csr", "server.crt", "ext.cnf")}
    paths["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", paths["ca.key"],
         "-out", paths["ca.crt"], "-days", "2", "-subj", "/CN=onnxcam test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", paths["server.key"],
         "-out", paths["server.csr"], "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.crt"], "-CAkey",
         paths["ca.key"], "-CAcreateserial", "-out", paths["server.crt"], "-days", "2",
         "-extfile", paths["ext.cnf"]],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return paths


def start_tls_redis(certificates: dict[str, Path], port: int, password: str) -> ServerProcess:
    """A redis-server that speaks TLS only and wants a password."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", REDIS_HOST,
         "--tls-cert-file", str(certificates["server.crt"]),
         "--tls-key-file", str(certificates["server.key"]),
         "--tls-ca-cert-file", str(certificates["ca.crt"]), "--tls-auth-clients", "no",
         "--requirepass", password, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = ServerProcess(process, port)
    wait_for(lambda: _answers(port) or process.poll() is not None, 10, "redis-server (TLS)")
    if process.poll() is not None:
        pytest.skip("this redis-server was built without TLS")
    return server

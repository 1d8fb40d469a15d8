"""The compose recipe, read as Docker would (no Docker here): what `onnxcam submit` on
the host sends must mean the same files to a worker in the container."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from onnxcam.worker.client import image_ref
from onnxcam.worker.sources import allowed_path

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${NAME} and ${NAME:-default}."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                  lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def test_compose_recipe_host_paths_reach_the_worker(tmp_path: Path) -> None:
    project = tmp_path / "project"  # where the README runs compose and submit from
    env = {"PWD": str(project), "ONNXCAM_UID": "1234", "ONNXCAM_GID": "5678"}
    compose = yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text(), env))
    worker = compose["services"]["worker"]
    assert worker["user"] == "1234:5678"  # the host's user: it owns ./store's job folders
    mounts = {}  # container path -> host path, as Docker resolves ../x from docker/
    for volume in worker["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (project / "docker" / source).resolve()
    (project / "images").mkdir(parents=True)
    big = project / "images" / "big.png"
    big.write_bytes(b"\0" * 300_000)  # over ONNXCAM_INLINE_MAX_BYTES: sent by path
    ref = image_ref(big, 256 * 1024, 0)
    assert ref.path == str(big) and ref.data is None
    # The worker sees the host's file under that very path, and may read it.
    container = Path(ref.path)
    assert any(container.is_relative_to(target) and mounts[target] == project / "images"
               for target in mounts)
    roots = worker["environment"]["ONNXCAM_ALLOWED_ROOTS"].split(":")
    assert allowed_path(str(big), roots) == big
    # ONNXCAM_STORE_URL=$PWD/store on the host is a mounted store in the container too.
    assert mounts[str(project / "store")] == mounts["/data/store"] == project / "store"


def test_images_leave_data_open_to_any_user() -> None:
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert "chmod 0755 /data" in text, name


def test_images_copy_only_what_the_repository_has() -> None:
    """Each COPY names a file or folder of the build context (the repository's root)."""
    for name in ("Dockerfile", "Dockerfile.gpu"):
        for line in (DOCKER / name).read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (DOCKER.parent / source).exists(), f"{name}: {line}"

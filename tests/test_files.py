"""onnxcam.files: atomic writes that leave the umask in charge of a file's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from onnxcam.files import atomic_write


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                             (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "deep" / "file.bin", b"payload")
        atomic_write(tmp_path / "deep" / "file.bin", b"again")  # replacing keeps the rule
    finally:
        os.umask(previous)
    path = tmp_path / "deep" / "file.bin"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"again"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temporary left


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rename(source: object, target: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(tmp_path / "file.bin", b"payload")
    assert list(tmp_path.iterdir()) == []

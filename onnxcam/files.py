"""Local files written whole or not at all, and read with a size limit."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

# Asked of the kernel for every new file; it takes the process's umask away, so files
# come out 0644 under umask 022 as with open(). mkstemp's fixed 0600 would leave a
# worker running as another user (the compose recipe) unable to read what submit wrote.
FILE_MODE = 0o666


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (or its parts, in order) under a temporary name beside ``path``
    and rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(handle, "wb") as stream:
            for part in [data] if isinstance(data, bytes) else data:
                stream.write(part)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

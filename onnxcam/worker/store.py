"""The result store: bundles by sha256 and job outputs, on any fsspec filesystem.

Keys are relative paths under the store's URL; which key holds what is written
once, in ``onnxcam.worker.keys``. Writes are atomic: on a local
folder through a temporary name and a rename, on object stores because a PUT
appears whole or not at all. Failures are sorted into "not there" (final) and
"unavailable" (transient, worth a retry).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec

from onnxcam.errors import StoreError, StoreUnavailableError, UnknownBundleError
from onnxcam.files import atomic_write
from onnxcam.worker.keys import bundle_key, sha256_hex

log = logging.getLogger(__name__)


class NotInStoreError(StoreError):
    code = "not_in_store"


class ObjectTooLargeError(StoreError):
    code = "too_large"


class NotAnObjectError(StoreError):
    """A key that names a folder (a common prefix on S3), not an object."""

    code = "not_an_object"


@contextmanager
def classified(what: str) -> Iterator[None]:
    """Turn a filesystem failure into NotInStoreError (final) or StoreUnavailableError."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError as exc:
        raise NotInStoreError(f"{what}: not in the store") from exc
    except IsADirectoryError as exc:
        raise NotAnObjectError(f"{what}: a folder, not an object") from exc
    except (PermissionError, NotADirectoryError) as exc:
        raise StoreError(f"{what}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - network, 5xx, throttling: all worth a retry
        raise StoreUnavailableError(f"{what}: store unavailable ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


class Store:
    """Bytes under keys, below one fsspec URL (a local folder or ``s3://bucket/prefix``)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        if self.local:
            self.root = os.path.abspath(self.root)

    @property
    def location(self) -> str:
        """The store as a person would name it: an absolute folder, or its URL."""
        return self.root if self.local else self.url

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"{key!r} is not a store key")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        """Where a key lives, as a URI a user or another tool can open."""
        path = self.path(key)
        return path if self.local else self.fs.unstrip_protocol(path)

    def put(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically under ``key``; return its URI."""
        path = self.path(key)
        with classified(key):
            if self.local:
                atomic_write(Path(path), data)
            else:
                self.fs.pipe_file(path, data)
        return self.uri(key)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` under ``key`` unless something is there; return whether it was
        written. On disk the check and the write are one step (a hard link, which fails
        when the name exists); elsewhere (S3) two, so two writers at once may both win."""
        path = self.path(key)
        with classified(key):
            if not self.local:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
            folder, name = os.path.split(path)
            temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.new")
            atomic_write(Path(temporary), data)
            try:
                os.link(temporary, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object under ``key``; with ``max_bytes``, a larger one is refused from its
        size alone, before any of it is read."""
        with classified(key):
            if max_bytes is not None:
                info = self.fs.info(self.path(key))
                if info.get("type") == "directory":
                    raise NotAnObjectError(f"{key}: a folder, not an object")
                size = info.get("size")
                if size is not None and size > max_bytes:
                    raise ObjectTooLargeError(f"{key}: {size} bytes, over the {max_bytes} limit")
            return bytes(self.fs.cat_file(self.path(key)))

    def find(self, key: str) -> bytes | None:
        """The object under ``key``, or None when there is none."""
        try:
            return self.get(key)
        except NotInStoreError:
            return None

    def exists(self, key: str) -> bool:
        with classified(key):
            return bool(self.fs.exists(self.path(key)))

    def modified(self, key: str) -> float | None:
        """When the object under ``key`` was last written (seconds since 1970), or None
        when there is none."""
        with classified(key):
            try:
                return modified_time(self.fs.info(self.path(key)))
            except FileNotFoundError:
                return None

    def names(self, folder: str) -> list[str]:
        """The names of the objects directly under ``folder``, sorted; none when there is
        no such folder."""
        with classified(folder):
            try:
                entries = self.fs.ls(self.path(folder), detail=False)
            except FileNotFoundError:
                return []
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def delete(self, key: str) -> None:
        with classified(key):
            if self.fs.exists(self.path(key)):
                self.fs.rm(self.path(key))

    def owns(self, uri: str) -> str | None:
        """The key of ``uri`` when it lies inside this store, else None.

        Read from the text alone: a URI from a message never instantiates a filesystem
        here (fsspec would open a chained ``tar://...::file://`` or dial an ``ftp://``)."""
        protocol, path = fsspec.core.split_protocol(uri)
        if (protocol or "file") not in _protocols(self.fs) or "::" in uri:
            return None
        if self.local:
            path = os.path.abspath(path)
        prefix = self.root + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    # -- bundles --

    def put_bundle(self, data: bytes) -> str:
        """Publish a bundle under its sha256 (once); return the hash."""
        sha = sha256_hex(data)
        key = bundle_key(sha)
        if not self.exists(key):
            self.put(key, data)
            log.info("published bundle %s", sha)
        return sha

    def get_bundle(self, sha: str) -> bytes:
        """The bundle stored under ``sha``, checked against it."""
        data = self.find(bundle_key(sha))
        if data is None:
            raise UnknownBundleError(f"no bundle {sha} in the store (publish it first)")
        if sha256_hex(data) != sha:
            raise StoreError(f"bundle {sha} in the store does not match its hash")
        return data


def modified_time(info: dict[str, Any]) -> float | None:
    """An fsspec ``info``'s modification time: a local file's ``mtime``, an S3 object's
    ``LastModified``; None for a folder or a filesystem that gives neither."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, int | float) else None


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)

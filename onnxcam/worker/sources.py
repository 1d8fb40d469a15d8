"""Where a job's images may come from: an allow-list checked before any I/O.

An image is read from a local path whose real path lies under ``ONNXCAM_ALLOWED_ROOTS``,
from the store, or from a URI under a prefix listed there, and only through a protocol
named in ``ONNXCAM_ALLOWED_PROTOCOLS``. A refusal is decided from the reference's text
(and, for a local path, its real path): nothing is opened, dialled or instantiated, and
the reply is the same whether the target exists or not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcam.engine.images import Limits, read_bytes
from onnxcam.errors import (
    BadImageError,
    ForbiddenPathError,
    InvalidPathError,
    MissingImageError,
    UnreachableImageError,
)
from onnxcam.worker.settings import DEFAULT_BOUNDS, Settings
from onnxcam.worker.store import (
    NotAnObjectError,
    NotInStoreError,
    ObjectTooLargeError,
    Store,
    StoreError,
    StoreUnavailableError,
    classified,
)

DEFAULT_PROTOCOLS = frozenset({"file", "s3"})
DEFAULT_INLINE_LIMIT = DEFAULT_BOUNDS.max_inline_image_bytes
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PATH_MAX = 4096  # bytes, as Linux's PATH_MAX


@dataclass(frozen=True)
class AllowList:
    """The local roots and URI prefixes images may come from, and the protocols and
    network timeouts for reading them."""

    roots: tuple[str, ...] = (".",)
    protocols: frozenset[str] = DEFAULT_PROTOCOLS
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    inline_limit: int = DEFAULT_INLINE_LIMIT  # the largest inline image, for refusals' hint

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowList:
        return cls(tuple(settings.roots), settings.protocols, settings.connect_timeout,
                   settings.read_timeout, settings.max_inline_image_bytes)

    def outside(self, what: str = "the allowed roots") -> str:
        """Why a path or URI outside every root is refused, and the way round it: the
        same words whether the target exists or not."""
        return outside_roots(self.roots, self.inline_limit, what)

    @property
    def folders(self) -> list[str]:
        """The local roots; a ``file://`` prefix is one too."""
        return [_local_part(root) for root in self.roots if _protocol(root) == "file"]

    @property
    def prefixes(self) -> list[str]:
        """The remote URI prefixes, scheme in lower case, without a trailing '/'."""
        return [_lower_scheme(root).rstrip("/") for root in self.roots
                if _protocol(root) != "file"]


def read_path(path: str, allowed: AllowList, limits: Limits) -> bytes:
    """A local image named by a job's ``path``."""
    _check_text(path)
    resolved = allowed_path(path, allowed.folders, refusal=allowed.outside())
    return read_bytes(resolved, limits, name=path, follow_links=False)


def read_uri(uri: str, store: Store, allowed: AllowList, limits: Limits) -> bytes:
    """An image named by a job's ``uri``: a local file, a store object or an object under
    an allowed prefix. A URI without a scheme is a local path."""
    _check_text(uri)
    if "::" in uri:  # fsspec would open each link of the chain: tar://x::file:///etc/shadow
        raise ForbiddenPathError(f"{uri}: chained URLs ('::') are not allowed")
    protocol = _protocol(uri)
    if protocol not in allowed.protocols:
        raise ForbiddenPathError(f"{uri}: protocol {protocol!r} is not allowed "
                                 "(ONNXCAM_ALLOWED_PROTOCOLS)")
    if protocol == "file":
        folders = [*allowed.folders, *([store.root] if store.local else [])]
        resolved = allowed_path(_local_part(uri), folders, shown=uri,
                                refusal=allowed.outside())
        return read_bytes(resolved, limits, name=uri, follow_links=False)
    return _read_remote(uri, store, allowed, limits)


def allowed_path(path: str, roots: Iterable[str], shown: str | None = None,
                 refusal: str | None = None) -> Path:
    """``path``'s real path (links followed, ``..`` resolved) when it lies under one of
    the local ``roots``; a root's name is compared whole, so ``/rootfoo`` is not under
    ``/root``. ``refusal`` is the error's text after the path (default: the roots).

    A path outside every root even as written is refused before any system call on it;
    the check that counts is on the real path, against each root's real path."""
    written = os.path.abspath(path)
    roots = list(roots)
    bases = [(os.path.abspath(root), os.path.realpath(root)) for root in roots]
    if any(_under(written, lexical) or _under(written, real) for lexical, real in bases):
        resolved = os.path.realpath(written)
        if any(_under(resolved, real) for _, real in bases):
            return Path(resolved)
    raise ForbiddenPathError(f"{shown or path}: {refusal or outside_roots(roots)}")


def outside_roots(roots: Iterable[str], inline_limit: int | None = None,
                  what: str = "the allowed roots") -> str:
    """The reason of a refusal outside ``roots``: the setting and the roots in force
    (local ones as absolute paths, as the worker resolves them), and, given the
    worker's ``inline_limit``, that small images can travel inside the job instead."""
    shown = [root if _protocol(root) != "file" else os.path.abspath(_local_part(root))
             for root in roots]
    in_force = f"ONNXCAM_ALLOWED_ROOTS={':'.join(shown)}" if shown else \
        "ONNXCAM_ALLOWED_ROOTS is empty: no roots are set"
    reason = f"outside {what} ({in_force})"
    if inline_limit is None:
        return reason
    if inline_limit <= 0:
        return f"{reason}; inline images are off too (ONNXCAM_MAX_INLINE_IMAGE_BYTES=0)"
    return (f"{reason}; images up to {inline_limit} bytes can be sent inline (as data) "
            "instead (ONNXCAM_MAX_INLINE_IMAGE_BYTES)")


def _network_options(protocol: str, connect_timeout: float,
                    read_timeout: float) -> dict[str, Any]:
    """fsspec storage options that bound a connection and each read, per protocol.

    Retries are few on purpose: an image that does not come ends only its own image.
    On S3 a silent host holds an image for about four read timeouts (two attempts at
    each of s3fs's two requests), a refused connection for about a second."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {
            "connect_timeout": connect_timeout, "read_timeout": read_timeout,
            "retries": {"max_attempts": 2, "mode": "standard"}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
            sock_connect=connect_timeout, sock_read=read_timeout)}}
    if protocol == "ftp":  # ftplib has one socket timeout for both
        return {"timeout": read_timeout}
    return {}


def _read_remote(uri: str, store: Store, allowed: AllowList, limits: Limits) -> bytes:
    canonical = _lower_scheme(uri)
    if any(part in (".", "..") for part in canonical.split("://", 1)[1].split("/")):
        raise ForbiddenPathError(f"{uri}: '.' and '..' are not allowed in a URI")
    protocol = _protocol(uri)
    key = None if store.local else store.owns(canonical)
    if key is not None:
        # The store's own failures stay transient: the job retries, as for its writes.
        return _read_object(store.url, protocol, key, uri, allowed, limits, transient=True)
    for prefix in allowed.prefixes:
        if canonical.startswith(prefix + "/"):
            return _read_object(prefix, protocol, canonical[len(prefix) + 1:], uri, allowed,
                                limits, transient=False)
    raise ForbiddenPathError(f"{uri}: {allowed.outside('the store and the allowed roots')}")


def _reader(url: str, protocol: str, connect_timeout: float, read_timeout: float) -> Store:
    # Cheap: fsspec keeps one filesystem per set of options (and endpoint).
    reader = Store(url, **_network_options(protocol, connect_timeout, read_timeout))
    if protocol in ("s3", "s3a"):
        # s3fs retries timeouts five times on its own, over botocore's attempts; this
        # filesystem is the readers' alone (fsspec keys instances by their options).
        reader.fs.retries = 1
    return reader


def _read_object(url: str, protocol: str, key: str, uri: str, allowed: AllowList,
                 limits: Limits, transient: bool) -> bytes:
    try:
        with classified(uri):  # some filesystems (ftp) dial when they are made
            reader = _reader(url, protocol, allowed.connect_timeout, allowed.read_timeout)
        return reader.get(key, max_bytes=limits.max_bytes)
    except NotInStoreError:
        raise MissingImageError(f"{uri}: no such object") from None
    except NotAnObjectError:
        raise BadImageError(f"{uri}: is a folder, not an image") from None
    except ObjectTooLargeError as exc:
        raise BadImageError(f"{uri}: {str(exc).split(': ', 1)[1]}") from None
    except StoreUnavailableError as exc:
        if transient:
            raise
        detail = str(exc).split(": store unavailable ", 1)[-1]
        raise UnreachableImageError(f"{uri}: no answer {detail}") from None
    except StoreError as exc:  # permissions, a key that is no key: this image only
        raise BadImageError(f"{uri}: cannot read ({str(exc).split(': ', 1)[-1]})") from None


def _check_text(text: str) -> None:
    """Refuse what no file system can name, before it reaches one."""
    if not text:
        raise InvalidPathError("an empty path or URI")
    if "\x00" in text:
        raise InvalidPathError(f"{text!r}: a NUL byte in a path or URI")
    try:
        size = len(os.fsencode(text))
    except UnicodeEncodeError:
        raise InvalidPathError(f"{text!r}: not encodable as a file name") from None
    if size > _PATH_MAX:
        raise InvalidPathError(f"a path or URI of {size} bytes, over {_PATH_MAX}")


def _protocol(uri: str) -> str:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def _lower_scheme(uri: str) -> str:
    match = _SCHEME.match(uri)
    return uri if match is None else match.group(0).lower() + uri[match.end():]


def _local_part(uri: str) -> str:
    match = _SCHEME.match(uri)
    return uri if match is None else uri[match.end():]


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


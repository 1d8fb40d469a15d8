"""Where a job's images may come from: an allow-list checked before any I/O.

An image is read from a local path whose real path lies under ``ONNXCAM_ALLOWED_ROOTS``,
from the store where ``ONNXCAM_STORE_READS`` lets jobs read it, or from a URI under a
prefix listed in the roots, and only through a protocol named in
``ONNXCAM_ALLOWED_PROTOCOLS``. A refusal is decided from the reference's text (and, for
a local path, its real path): nothing is opened, dialled or instantiated, and the reply
is the same whether the target exists or not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from onnxcam.engine.images import Limits, read_bytes
from onnxcam.errors import (
    BadImageError,
    ForbiddenPathError,
    InvalidPathError,
    MissingImageError,
    UnreachableImageError,
)
from onnxcam.worker.keys import INPUT_PREFIX
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
_PATH_MAX = 4096  # bytes with the closing NUL, as Linux's PATH_MAX: 4095 at most
_NAME_MAX = 255  # bytes of one name in a local path
# Protocols whose servers percent-decode a URI's path (some more than once) and
# resolve its dot segments: a prefix is compared on every decoding of it.
_DECODED = frozenset({"http", "https"})


@dataclass(frozen=True)
class AllowList:
    """The local roots and URI prefixes images may come from, and the protocols and
    network timeouts for reading them."""

    roots: tuple[str, ...] = (".",)
    protocols: frozenset[str] = DEFAULT_PROTOCOLS
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    inline_limit: int = DEFAULT_INLINE_LIMIT  # the largest inline image, for refusals' hint
    store_reads: str = "inputs"  # ONNXCAM_STORE_READS: none, inputs or all

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowList:
        return cls(tuple(settings.roots), settings.protocols, settings.connect_timeout,
                   settings.read_timeout, settings.max_inline_image_bytes,
                   settings.store_reads)

    def check_store_key(self, key: str, shown: str) -> None:
        """Refuse a store object jobs may not read (another job's overlay, say), from
        its key alone: the same reply whether the object exists or not."""
        if self.store_reads == "all" or (
                self.store_reads == "inputs" and key.startswith(INPUT_PREFIX + "/")):
            return
        which = "store objects" if self.store_reads == "none" else \
            f"store objects outside {INPUT_PREFIX}/"
        raise ForbiddenPathError(f"{shown}: {which} are not read as images "
                                 f"(ONNXCAM_STORE_READS={self.store_reads})")

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


def read_path(path: str, store: Store, allowed: AllowList, limits: Limits) -> bytes:
    """A local image named by a job's ``path``."""
    _check_text(path, local=True)
    resolved = allowed_path(path, allowed.folders, refusal=allowed.outside())
    _check_store_file(resolved, store, allowed, path)
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
        _check_text(_local_part(uri), local=True)
        folders = [*allowed.folders, *([store.root] if store.local else [])]
        resolved = allowed_path(_local_part(uri), folders, shown=uri,
                                refusal=allowed.outside())
        _check_store_file(resolved, store, allowed, uri)
        return read_bytes(resolved, limits, name=uri, follow_links=False)
    return _read_remote(uri, store, allowed, limits)


def _check_store_file(resolved: Path, store: Store, allowed: AllowList, shown: str) -> None:
    """A local file inside a local store, by whichever root it was reached, is a store
    object: ONNXCAM_STORE_READS decides."""
    if store.local:
        base = os.path.realpath(store.root)
        if _under(str(resolved), base):
            allowed.check_store_key(os.path.relpath(resolved, base), shown)


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
        allowed.check_store_key(key, uri)
        # The store's own failures stay transient: the job retries, as for its writes.
        return _read_object(store.url, protocol, key, uri, allowed, limits, transient=True)
    for prefix in allowed.prefixes:
        if canonical.startswith(prefix + "/"):
            rest = canonical[len(prefix) + 1:]
            if protocol in _DECODED and _climbs(rest):
                raise ForbiddenPathError(f"{uri}: '.', '..' and '\\' are not allowed in a URI, "
                                         "percent-encoded or not")
            return _read_object(prefix, protocol, rest, uri, allowed, limits,
                                transient=False)
    raise ForbiddenPathError(f"{uri}: {allowed.outside('the store and the allowed roots')}")


def _climbs(rest: str, rounds: int = 4) -> bool:
    """Whether the path after a prefix could leave it once a server has decoded it:
    a '.' or '..' segment, or a backslash, in it as written or after any number of
    percent-decodings (``%2e%2e``, ``%252e``, ``..%2F``). More than ``rounds`` layers
    of encoding count as leaving too: no client needs them."""
    path = rest.split("?", 1)[0].split("#", 1)[0]
    for _ in range(rounds):
        if "\\" in path or any(part in (".", "..") for part in path.split("/")):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


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


def _check_text(text: str, local: bool = False) -> None:
    """Refuse what no file system can name, before it reaches one; for a ``local``
    path, a name longer than a Linux file system takes too."""
    if not text:
        raise InvalidPathError("an empty path or URI")
    size = len(text.encode("utf-8", "surrogatepass"))  # before any message quotes it
    if size >= _PATH_MAX:
        raise InvalidPathError(f"a path or URI of {size} bytes, over the limit of "
                               f"{_PATH_MAX - 1}")
    if "\x00" in text:
        raise InvalidPathError(f"{text!r}: a NUL byte in a path or URI")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise InvalidPathError(f"{text!r}: not encodable as a file name") from None
    longest = max(len(os.fsencode(name)) for name in text.split("/"))
    if local and longest > _NAME_MAX:
        raise InvalidPathError(f"a name of {longest} bytes in a path, over the limit of "
                               f"{_NAME_MAX}")


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


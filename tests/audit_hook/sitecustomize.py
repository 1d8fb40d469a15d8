"""Loaded at start-up by a worker whose PYTHONPATH names this folder (the fuzz tests):
an audit hook (PEP 578) that notes every file opened or folder listed under
``AUDIT_WATCHED`` (a canary outside the allowed roots, links resolved), and every
socket connection to anything but ``AUDIT_ALLOWED_PORT`` (the broker), one line
each in ``AUDIT_LOG``. Pool processes inherit it when forked."""

from __future__ import annotations

import os
import sys
import threading

_WATCHED = os.environ.get("AUDIT_WATCHED")
_LOG = os.environ.get("AUDIT_LOG")
_ALLOWED_PORT = int(os.environ.get("AUDIT_ALLOWED_PORT", "0"))
_EVENTS = ("open", "os.listdir", "os.scandir", "socket.connect")
_state = threading.local()  # the hook's own work (realpath, the write) must not re-enter it


def _note(line: str) -> None:
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _hook(event: str, args: tuple) -> None:
    if event not in _EVENTS or getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and address[1] != _ALLOWED_PORT:
                _note(f"{os.getpid()} connect {address!r}")
        elif args and isinstance(args[0], str | bytes):
            path = os.fsdecode(args[0]).split("\0")[0]  # the kernel stops at a NUL too
            if os.path.realpath(path).startswith(_WATCHED):
                _note(f"{os.getpid()} {event} {path!r}")
    except Exception as exc:  # noqa: BLE001 - a hook that raises would fail the open
        _note(f"{os.getpid()} hook error {exc!r}")
    finally:
        _state.busy = False


if _WATCHED and _LOG:
    sys.addaudithook(_hook)

"""Queue items built to hurt a worker: raw Redis list entries in kombu's envelope (or
not), in Celery's protocol 1 and 2, each broken in one field.

``envelope`` builds what ``celery.send_task`` would LPUSH; ``POISON`` breaks it one way
per entry. The service tests push these onto the ``onnxcam`` list of a real Redis.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

TASK = "onnxcam.explain"
QUEUE = "onnxcam"


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def envelope(job: Any, job_id: str | None = None, protocol: int = 2,
             **overrides: Any) -> dict[str, Any]:
    """A kombu Redis queue item carrying ``job`` as the task's one argument."""
    job_id = job_id or str(uuid.uuid4())
    properties = {"correlation_id": job_id, "reply_to": "", "delivery_mode": 2,
                  "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
                  "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
    if protocol == 2:
        headers: dict[str, Any] = {
            "lang": "py", "task": TASK, "id": job_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": job_id, "parent_id": None,
            "argsrepr": "", "kwargsrepr": "", "origin": "attacker", "ignore_result": False}
        body = b64json([[job], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}])
    else:
        headers = {}
        body = b64json({"task": TASK, "id": job_id, "args": [job], "kwargs": {},
                        "retries": 0, "eta": None, "expires": None, "utc": True,
                        "callbacks": None, "errbacks": None, "timelimit": [None, None],
                        "taskset": None, "chord": None})
    item = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": headers, "properties": properties}
    item.update(overrides)
    return item


def _with(path: str, value: Any, protocol: int = 2) -> Callable[[Any], bytes]:
    """An envelope with the field at ``path`` (dots: nesting) set to ``value``."""
    def build(job: Any) -> bytes:
        item = envelope(job, protocol=protocol)
        *parents, leaf = path.split(".")
        target = item
        for name in parents:
            target = target[name]
        target[leaf] = value
        return json.dumps(item).encode()
    return build


def _without(path: str, protocol: int = 2) -> Callable[[Any], bytes]:
    def build(job: Any) -> bytes:
        item = envelope(job, protocol=protocol)
        *parents, leaf = path.split(".")
        target = item
        for name in parents:
            target = target[name]
        del target[leaf]
        return json.dumps(item).encode()
    return build


def _body(value: Any, protocol: int = 2, raw: bool = False) -> Callable[[Any], bytes]:
    """A well-formed envelope around a body of the wrong shape."""
    encoded = base64.b64encode(value).decode() if raw else b64json(value)
    return _with("body", encoded, protocol)


def _raw(data: bytes) -> Callable[[Any], bytes]:
    return lambda job: data


_NESTED = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON decoder recurses

# Each entry: how to build the queue item from a good job message.
POISON: dict[str, Callable[[Any], bytes]] = {
    # not an envelope at all
    "not json": _raw(b"\x00\xff not json at all"),
    "json list": _raw(b"[1, 2]"),
    "json object": _raw(b"{}"),
    "wrong field types": _raw(b'{"body": 5, "headers": 1}'),
    "nested garbage": _raw(_NESTED.encode()),
    "huge garbage": _raw(b'{"x": "' + b"A" * 4_000_000 + b'"}'),
    # kombu's envelope broken
    "no properties": _without("properties"),
    "properties a list": _with("properties", [1]),
    "no delivery tag": _without("properties.delivery_tag"),
    "delivery tag a list": _with("properties.delivery_tag", [1, 2]),
    "delivery tag null": _with("properties.delivery_tag", None),
    "bad base64 body": _with("body", "%%% not base64 %%%"),
    "unknown body encoding": _with("properties.body_encoding", "rot13"),
    "content type application/data": _with("content-type", "application/data"),
    "content type pickle": _with("content-type", "application/x-python-serialize"),
    "content type yaml": _with("content-type", "application/x-yaml"),
    "content encoding binary": _with("content-encoding", "binary"),
    "no delivery info": _without("properties.delivery_info"),
    # Celery's headers broken (protocol 2)
    "no headers": _without("headers"),
    "headers null": _with("headers", None),
    "headers a list": _with("headers", ["task"]),
    "unknown task": _with("headers.task", "celery.backend_cleanup.evil"),
    "task name a list": _with("headers.task", ["onnxcam.explain"]),
    "task id missing": _without("headers.id"),
    "task id a dict": _with("headers.id", {"x": 1}),
    "retries a string": _with("headers.retries", "many"),
    "eta garbage": _with("headers.eta", "not a date"),
    "expires garbage": _with("headers.expires", [1]),
    "timelimit garbage": _with("headers.timelimit", "forever"),
    "eta in year 9999": _with("headers.eta", "9999-01-01T00:00:00+00:00"),
    "group index a string": _with("headers.group_index", "x"),
    # Celery's body broken (protocol 2)
    "body {'a': 1}": _body({"a": 1}),
    "body json null": _body(None),
    "body a string": _body("args"),
    "body one element": _body([["x"]]),
    "body args a string": _body(["abc", {}, {}]),
    "body kwargs a list": _body([[], [1], {}]),
    "body embed a string": _body([[], {}, "embed"]),
    "body embed callbacks garbage": _body([[{}], {}, {"callbacks": 5, "chain": "x"}]),
    "body not json": _body(b"\x00\x01 not json", raw=True),
    "body not utf-8": _body(b"\xff\xfe\xfd", raw=True),
    # protocol 1, broken in each field
    "protocol 1 body {'a': 1}": _body({"a": 1}, protocol=1),
    "protocol 1 no id": _body({"task": TASK, "args": [{}], "kwargs": {}}, protocol=1),
    "protocol 1 args a string": _body({"task": TASK, "id": "p1-args", "args": "x",
                                       "kwargs": {}}, protocol=1),
    "protocol 1 kwargs a list": _body({"task": TASK, "id": "p1-kwargs", "args": [],
                                       "kwargs": [1]}, protocol=1),
    "protocol 1 unknown task": _body({"task": "os.system", "id": "p1-task", "args": ["id"],
                                      "kwargs": {}}, protocol=1),
    "protocol 1 task a dict": _body({"task": {"a": 1}, "id": "p1-dict", "args": [],
                                     "kwargs": {}}, protocol=1),
    "protocol 1 eta garbage": _body({"task": TASK, "id": "p1-eta", "args": [{}],
                                     "kwargs": {}, "eta": "soon"}, protocol=1),
    "protocol 1 body a list": _body([1, 2, 3], protocol=1),
    "protocol 1 eta in year 9999": _body({"task": TASK, "id": "p1-far", "args": [{}],
                                          "kwargs": {}, "eta": "9999-01-01T00:00:00"},
                                         protocol=1),
    "body nested garbage": _body(_NESTED.encode(), raw=True),
}

"""The worker service's import path in 0.1, kept until 0.3: ``onnxcam.worker.service.X``
is ``onnxcam.worker.X`` (``layout`` is ``keys`` and ``records`` together), so
``celery -A onnxcam.worker.service.app`` and old imports keep working, with a
DeprecationWarning."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

warnings.warn("onnxcam.worker.service is onnxcam.worker now (the Celery app: "
              "onnxcam.worker.app); the old path goes in 0.3", DeprecationWarning, stacklevel=2)

for _name in ("app", "broker", "client", "jobs", "settings", "sources", "store", "tasks"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"onnxcam.worker.{_name}")

_layout = types.ModuleType(f"{__name__}.layout", "keys and records, as 0.1 named them")
for _part in ("keys", "records"):
    _module = importlib.import_module(f"onnxcam.worker.{_part}")
    _layout.__dict__.update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
sys.modules[_layout.__name__] = _layout

"""onnxruntime sessions: device choice, a quiet CUDA probe, thread settings, and runs
in chunks of a fixed batch size."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
# Libraries the CUDA provider loads; if one is missing, asking ORT for CUDA only
# fills the log with loader errors, so the probe looks for them first. The driver
# (libcuda) comes with the GPU, not with a wheel: pip's CUDA wheels (torch's) load on
# a machine without a GPU, and only the driver tells that none is there.
CUDA_DRIVER = ("libcuda.so.1", "nvcuda.dll")
CUDA_LIBRARIES = (
    CUDA_DRIVER,
    ("libcudart.so.13", "libcudart.so.12"),
    ("libcublasLt.so.13", "libcublasLt.so.12"),
    ("libcudnn.so.9",),
)


def session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    """``arena=False`` gives memory back after each run instead of keeping the run's
    peak for the next (what a worker under a memory ceiling wants)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    return options


def cpu_session(model: bytes | str, threads: int | None = None,
                lean: bool = False, quiet: bool = False) -> ort.InferenceSession:
    """A plain CPU session, as the exporter uses for probing and verification.

    ``lean`` is for a run or two that only reads shapes and values: no weight
    prepacking and only basic graph rewrites, each of which would otherwise make a
    second copy of a large model's weights while the session loads. ``quiet`` is for
    a probe whose failure is an answer, not a fault: onnxruntime would print each
    failed kernel on stderr (from C++, past Python's logging) even when it is caught.
    """
    options = session_options(threads)
    if quiet:
        options.log_severity_level = 4  # fatal only
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model, options, providers=[CPU])


def cpu_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _loadable(names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _preload_quietly() -> None:
    """Let onnxruntime load CUDA libraries shipped as pip wheels, without its chatter."""
    if not hasattr(ort, "preload_dlls") or importlib.util.find_spec("nvidia") is None:
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a failed preload just means no CUDA
            pass


def gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU at all: its device files on Linux (WSL's
    /dev/dxg), the driver library elsewhere. onnxruntime reports its loader errors on
    stderr whatever the log level, so without a GPU it is never asked for CUDA."""
    if sys.platform.startswith("linux"):
        return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))
    return _loadable(CUDA_DRIVER)


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when a CUDA session really runs here; probed once per process, quietly."""
    if CUDA not in ort.get_available_providers() or not gpu_present():
        return False
    _preload_quietly()
    if not all(_loadable(names) for names in CUDA_LIBRARIES):
        return False
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        options = session_options(1)
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=[CUDA, CPU])
        session.run(None, {"x": np.ones(1, np.float32)})
        return session.get_providers()[0] == CUDA
    except Exception:  # noqa: BLE001 - any failure means CUDA is not usable
        return False


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when usable, else 'cpu'; 'cuda' falls back with one log line."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if device == "cuda":
        log.warning("CUDA was asked for but is not usable here; running on the CPU")
    else:
        log.info("no usable CUDA device; running on the CPU")
    return "cpu"


def make_session(
    model: bytes | str, device: str = "auto", threads: int | None = None, arena: bool = True
) -> tuple[ort.InferenceSession, str]:
    """A session on the chosen device, and the device it really runs on."""
    chosen = resolve_device(device)
    providers = [CUDA, CPU] if chosen == "cuda" else [CPU]
    session = ort.InferenceSession(model, session_options(threads, arena), providers=providers)
    if chosen == "cuda" and session.get_providers()[0] != CUDA:
        log.warning("CUDA session could not be created; running on the CPU")
        chosen = "cpu"
    return session, chosen


# How onnxruntime words a failed allocation: its arena's, or C++'s bad_alloc.
_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "bad allocation")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a MemoryError (numpy, Pillow), or an
    onnxruntime error raised for an allocation it could not make."""
    if isinstance(exc, MemoryError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith("onnxruntime") and any(words in str(exc)
                                                   for words in _OUT_OF_MEMORY)


RunFn = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


def run_in_chunks(run: RunFn, names: list[str], feeds: dict[str, np.ndarray],
                  size: int) -> list[np.ndarray]:
    """``run`` on exactly ``size`` rows at a time, for a bundle of fixed batch size.

    The last chunk is padded with copies of its last row and the padding's outputs
    dropped, so each row's outputs are those of a run at the model's own batch.
    Precondition: every feed and every output has the batch on axis 0.
    """
    total = len(next(iter(feeds.values())))
    if total == size or total == 0:
        return list(run(names, feeds))
    pieces: list[list[np.ndarray]] = []
    for start in range(0, total, size):
        chunk = {name: value[start : start + size] for name, value in feeds.items()}
        kept = len(next(iter(chunk.values())))
        if kept < size:
            chunk = {name: np.concatenate([value, np.repeat(value[-1:], size - kept, axis=0)])
                     for name, value in chunk.items()}
        pieces.append([output[:kept] for output in run(names, chunk)])
    return [np.concatenate(parts) for parts in zip(*pieces)]


def run_each_in_copies(run: RunFn, names: list[str], feeds: dict[str, np.ndarray],
                       size: int) -> list[np.ndarray]:
    """``run`` each row alone in a batch of ``size`` copies of itself; the first copy's
    outputs, stacked. Where a fixed-batch graph mixes the samples of a batch, this is
    one well-defined batch per row, which verification can rebuild on both sides.
    Precondition: every feed and every output has the batch on axis 0.
    """
    total = len(next(iter(feeds.values())))
    runs = [run(names, {name: np.repeat(value[n : n + 1], size, axis=0)
                        for name, value in feeds.items()}) for n in range(total)]
    return [np.concatenate([outputs[k][:1] for outputs in runs]) for k in range(len(names))]

"""A worker process's memory ceiling (ONNXCAM_MAX_JOB_MEMORY), and what a job ends with
when memory runs out (out_of_memory) or onnxruntime refuses to run the bundle
(bad_bundle): a job error, never the worker's exit nor a bare Celery failure."""

from __future__ import annotations

import logging
import re
import resource

from onnxcam.bundle_checks import in_units
from onnxcam.errors import BundleError, OnnxcamError, OutOfMemoryError
from onnxcam.runtime import out_of_memory

log = logging.getLogger(__name__)


def limit_process_memory(limit: int) -> None:
    """Make ``limit`` bytes (0: none) this process's data limit (RLIMIT_DATA: its heap
    and private mappings, where numpy and onnxruntime allocate), so that going over
    raises here, in the job, instead of waking the kernel's OOM killer."""
    if not limit:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    log.info("this worker process may hold %s (ONNXCAM_MAX_JOB_MEMORY)", in_units(soft))


def out_of_memory_error(exc: BaseException, limit: int) -> OutOfMemoryError:
    """The job error for ``exc``, a MemoryError or an onnxruntime allocation failure
    (``runtime.out_of_memory``). onnxruntime's own text holds file paths and the
    bundle's node names, so only the op it was running is kept."""
    if isinstance(exc, MemoryError):
        what = (str(exc).strip().splitlines() or ["MemoryError"])[0][:200]
    else:
        running = re.search(r"running (\w+) node", str(exc))
        what = f"onnxruntime, running {running[1]}" if running else "onnxruntime"
    ceiling = in_units(limit) if limit else "no limit"
    return OutOfMemoryError(f"the job ran out of memory ({what}); a worker process may hold "
                            f"ONNXCAM_MAX_JOB_MEMORY = {ceiling}")


def runtime_job_error(exc: BaseException, limit: int) -> OnnxcamError | None:
    """The job error for ``exc`` raised while a job ran, if it is one: memory running out
    (``out_of_memory_error``), or onnxruntime failing to run a bundle that loaded (a
    graph at odds with itself, such as a Reshape to a size its input has not); None
    for anything else."""
    if out_of_memory(exc):
        return out_of_memory_error(exc, limit)
    if (type(exc).__module__ or "").startswith("onnxruntime"):
        text = str(exc).strip().splitlines()
        return BundleError(f"onnxruntime cannot run the bundle: {(text or ['?'])[0][:200]}")
    return None

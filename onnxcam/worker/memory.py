"""A worker process's memory ceiling (ONNXCAM_MAX_JOB_MEMORY) and what a job that
meets it ends with: out_of_memory, never the worker's exit."""

from __future__ import annotations

import logging
import re
import resource

from onnxcam.bundle_checks import in_units
from onnxcam.errors import OutOfMemoryError

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

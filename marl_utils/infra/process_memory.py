"""The resident set of this process, as the kernel counts it: now, at its peak, and the peak reset.

`marl bench` (bench/memory.py) and the cost of a training run (run_cost.py) read memory this way. VmRSS / VmHWM
come from /proc/self/status; `getrusage(...).ru_maxrss` is only the fallback: a process started from a bigger one
inherits that one's peak in ru_maxrss.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """This process's resident set now (None where /proc is missing)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, else ru_maxrss (kB on Linux, bytes on macOS)."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def return_free_heap() -> None:
    """Hand memory freed by loading back to the OS (glibc keeps freed heap otherwise; a no-op elsewhere).

    On-the-fly quantization frees about the float32 model's size in temporaries; without this they would
    stay in the resident set of a quantized layout for the whole run although nothing uses them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident set (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

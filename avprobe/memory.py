"""Peak resident memory of one region of code, on Linux and elsewhere.

`getrusage().ru_maxrss` cannot do this: it is the process's peak since it started and, on
Linux, a child started by a larger parent inherits the parent's figure across exec (the
benchmark's memory children all read the parent's 4.5 GB peak that way). `PeakRSS` instead

1. returns freed heap pages to the system (`malloc_trim`), so that the region's allocations
   show up as new resident pages rather than reusing pages freed earlier;
2. resets the kernel's high-water mark (`VmHWM`) to the current RSS by writing 5 to
   `/proc/self/clear_refs` (Linux >= 4.0), then reads `VmHWM` after the region;
3. where that reset is refused (a sandbox), samples RSS from a thread every `interval`
   seconds instead; the result says which (`how`), since sampling can miss a short peak.
   Without /proc (macOS) there is nothing to read: `how` is "unavailable" and the figures
   are None, never a made-up 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process in MB (None where /proc is absent)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def process_peak_mb() -> float:
    """Peak resident memory of this process (its own, not a parent's), in MB."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes


def trim_heap() -> None:
    """Collect garbage and give free heap pages back to the system (glibc only)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel did."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    # the reset sets HWM to the RSS of the moment; allow for pages touched since
    return hwm is not None and rss is not None and hwm <= rss + 1024


@dataclass
class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.before_mb`, `m.peak_mb`, `m.above_mb` (the region's
    peak above the RSS it started from) and `m.how` ("hwm-reset", "sampled" or
    "unavailable", when the figures are None)."""

    interval: float = 0.001
    before_mb: float | None = None
    peak_mb: float | None = None
    how: str = ""

    @property
    def above_mb(self) -> float | None:
        if self.peak_mb is None or self.before_mb is None:
            return None
        return max(0.0, self.peak_mb - self.before_mb)

    def __enter__(self) -> PeakRSS:
        trim_heap()
        self.before_mb = rss_mb()
        self._stop = threading.Event()
        self._thread = None
        if self.before_mb is None:
            self.how = "unavailable"
        elif _reset_high_water_mark():
            self.how = "hwm-reset"
        else:
            self.how = "sampled"
            self._sampled = self.before_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, rss_mb() or 0.0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._sampled, rss_mb() or 0.0)
        elif self.how == "hwm-reset":
            self.peak_mb = _status_kb("VmHWM") / 1024

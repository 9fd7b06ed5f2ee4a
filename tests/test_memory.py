"""avprobe.memory: the peak of a region, not of the process or its parent."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from avprobe import memory

pytestmark = pytest.mark.skipif(memory.rss_mb() is None, reason="no /proc/self/status on this system")
MB = 2**20


def _touch(n_mb: int) -> np.ndarray:
    a = np.ones(n_mb * MB, dtype=np.uint8)  # np.ones writes every page: all of it is resident
    time.sleep(0.05)  # held a while: the sampling fallback cannot see inside one C call
    return a


def test_region_peak_counts_what_the_region_allocates():
    with memory.PeakRSS() as m:
        a = _touch(200)
        del a
    assert m.how in ("hwm-reset", "sampled")
    assert 180 <= m.above_mb <= 260, m


def test_an_earlier_larger_peak_does_not_hide_the_regions_own():
    a = _touch(400)
    del a
    with memory.PeakRSS() as m:
        b = _touch(50)
        del b
    assert 40 <= m.above_mb <= 120, m  # not ~400: the high-water mark was reset


def test_sampling_fallback_when_the_kernel_refuses_the_reset(monkeypatch):
    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with memory.PeakRSS(interval=0.0005) as m:
        a = _touch(200)
        del a
    assert m.how == "sampled"
    assert 150 <= m.above_mb <= 260, m


def test_a_child_does_not_inherit_its_parents_peak():
    """ru_maxrss in a child started by a large parent reads the parent's peak on Linux;
    process_peak_mb reads the child's own."""
    a = _touch(300)
    code = "import json; from avprobe import memory; print(json.dumps(memory.process_peak_mb()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del a
    assert json.loads(out.stdout) < 250

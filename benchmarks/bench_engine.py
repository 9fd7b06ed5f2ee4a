"""avprobe's engine against the paper's protocol: the script form of `avprobe bench`.

The benchmark lives in the package (avprobe/bench/engine.py, avprobe/bench/naive.py, options
in avprobe/bench/cli.py); this script takes the same options:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_engine.py --shape cpu [--prefix-path dense]
    avprobe bench --shape tiny --repeats 1                   # the same, installed
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: a shared machine by default
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout that is not installed

    from avprobe.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))

"""The pipeline: from a model and a sample set to the evidence the claims read.

    gather.py    the one orchestration (store -> engine on a miss -> judge), used by
                 `avprobe collect` and by the pytest plugin alike
    collect.py   the engine over samples, one stored record per (sample, query)
    evidence.py  the tidy view of the records and judged fidelities that claims read
    cli.py       `avprobe collect` (sharded, resumable)
"""

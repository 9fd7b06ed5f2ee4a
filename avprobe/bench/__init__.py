"""Performance of avprobe's engine against the paper's protocol (`avprobe bench`).

- `avprobe/bench/naive.py`: the protocols measured against (the paper's code, a careful
  user's, the floor, the nnsight peer);
- `avprobe/bench/engine.py`: the sweep, the token-equality check, timing and memory;
- `avprobe/bench/cli.py`: `avprobe bench` (and `benchmarks/bench_engine.py`, its script form).

This module holds only what the command line needs to build its parser (no torch import).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("engine", "floor", "careful", "naive", "nnsight")
FAST = ("engine", "floor")  # timed every round; the others only in the first --slow-repeats


@dataclass(frozen=True)
class Shape:
    """A model and prompt size to benchmark."""

    name: str
    n_layers: int
    hidden: int
    seconds: float  # clip length (audio at 25 tokens per second)
    size: int  # frame width in pixels
    new_tokens: int
    fps: float = 2.0
    height: int | None = None  # frame height (None: square frames)
    # the model's own pixel budget per frame (None: the frame's size, no resizing)
    min_pixels: int | None = None
    max_pixels: int | None = None


SHAPES = {
    "tiny": Shape("tiny", 4, 64, 4.0, 56, 8),
    "organism": Shape("organism", 8, 64, 4.0, 56, 32),  # used only if the organism is absent
    "cpu": Shape("cpu", 12, 256, 10.0, 392, 64),
    "flow4k": Shape("flow4k", 4, 128, 10.0, 560, 8),  # ~4,300 prompt tokens, for the flow memory
    # a 10 s AudioCaps clip (640x360) under Qwen2.5-Omni's pixel budget: 644x364 frames,
    # 2,990 video + 250 audio tokens
    "qwen2.5-omni-3b": Shape("qwen2.5-omni-3b", 36, 2048, 10.0, 640, 64, height=360,
                             min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28),
}

__all__ = ["FAST", "METHODS", "SHAPES", "Shape"]

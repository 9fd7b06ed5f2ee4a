"""The physical limit of a sweep: what the device's memory bandwidth and arithmetic allow.

A decode step must read every weight of the text model once (whatever the number of rows)
and the keys and values its rows attend to, and do 2 FLOPs per weight per row plus the
attention's products; a prefill does the same over the prompt's positions. The step's floor
is the larger of bytes / bandwidth and FLOPs / peak; the sweep's limit is the prefill's floor
plus every step's. Every method is then reported as a multiple of that limit. The media
encoders' arithmetic (vision and audio towers, once per clip) is left out: the limit is the
text model's, so it is a lower bound.

Peaks: a CPU's are measured here (a matrix-product probe for FLOPs, a copy probe for
bandwidth, with the benchmark's threads); for GPUs whose datasheet figures are known
(`GPU_PEAKS`) those are used, other devices are probed the same way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from avprobe.adapters.base import ModelAdapter

# Dense (no sparsity) peak arithmetic per dtype and memory bandwidth, from NVIDIA's datasheets:
# "NVIDIA H100 Tensor Core GPU" datasheet, SXM5 column: FP32 67 TFLOPS, TF32 494.7 (dense;
# 989 with sparsity), BF16/FP16 989.4 TFLOPS dense (1,979 with sparsity), HBM3 3.35 TB/s.
# "NVIDIA H200 Tensor Core GPU" datasheet, SXM column: the same compute (FP32 67, BF16 989
# dense), HBM3e 4.8 TB/s. (The PCIe/NVL parts are slower: they are matched by name first.)
GPU_PEAKS: dict[str, dict[str, Any]] = {
    "H100 PCIe": {"flops": {"float32": 51e12, "bfloat16": 756e12, "float16": 756e12}, "bandwidth": 2.0e12,
                  "source": "NVIDIA H100 datasheet, PCIe: FP32 51 TFLOPS, BF16 756 TFLOPS dense, 2.0 TB/s"},
    "H100 NVL": {"flops": {"float32": 60e12, "bfloat16": 835e12, "float16": 835e12}, "bandwidth": 3.9e12,
                 "source": "NVIDIA H100 datasheet, NVL: FP32 60 TFLOPS, BF16 835 TFLOPS dense, 3.9 TB/s"},
    "H100": {"flops": {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12}, "bandwidth": 3.35e12,
             "source": "NVIDIA H100 datasheet, SXM5: FP32 67 TFLOPS, BF16 989 TFLOPS dense, HBM3 3.35 TB/s"},
    "H200": {"flops": {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12}, "bandwidth": 4.8e12,
             "source": "NVIDIA H200 datasheet, SXM: FP32 67 TFLOPS, BF16 989 TFLOPS dense, HBM3e 4.8 TB/s"},
}


@dataclass
class Peaks:
    flops: float  # FLOP/s in the benchmark's dtype
    bandwidth: float  # bytes/s
    source: str  # "datasheet: ..." or "measured: ..."

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_peaks(device: str = "cpu", dtype: str = "float32", budget_s: float = 1.0) -> Peaks:
    """The device's own peaks: the best of several n x n matrix products (2 n^3 FLOPs each, in
    `dtype`) and of several copies of a buffer far larger than the caches (read + write)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    n = 1024 if dev.type == "cpu" else 8192
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    torch.matmul(a, b)  # warm-up
    best_mm, end = float("inf"), time.perf_counter() + budget_s / 2
    while time.perf_counter() < end or best_mm == float("inf"):
        _sync(dev)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(dev)
        best_mm = min(best_mm, time.perf_counter() - t0)
    del a, b
    nbytes = (256 if dev.type == "cpu" else 2048) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (pages touched)
    best_cp, end = float("inf"), time.perf_counter() + budget_s / 2
    while time.perf_counter() < end or best_cp == float("inf"):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best_cp = min(best_cp, time.perf_counter() - t0)
    flops, bw = 2 * n**3 / best_mm, 2 * nbytes / best_cp
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    return Peaks(flops, bw, f"measured: {n}x{n} {dtype} matmul {flops / 1e9:.1f} GFLOP/s, "
                            f"{nbytes >> 20} MiB copy {bw / 1e9:.1f} GB/s{threads}")


def datasheet_peaks(name: str, dtype: str) -> Peaks | None:
    """The GPU_PEAKS entry whose key is in the device's name (the specific PCIe and NVL parts
    first), for `dtype`; None for a device not listed."""
    for key, p in GPU_PEAKS.items():
        if key in name and dtype in p["flops"]:
            return Peaks(p["flops"][dtype], p["bandwidth"], f"datasheet ({name}): {p['source']}")
    return None


def device_peaks(device: str = "cpu", dtype: str = "float32", budget_s: float = 1.0) -> Peaks:
    """Datasheet peaks for a GPU named in GPU_PEAKS, else `measure_peaks`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        listed = datasheet_peaks(torch.cuda.get_device_name(dev), dtype)
        if listed is not None:
            return listed
    return measure_peaks(device, dtype, budget_s)


@dataclass
class ModelCost:
    """What one decode row and one prompt position cost a text model."""

    weight_bytes: int  # every weight a step reads (text decoder and the unembedding)
    matmul_params: int  # weights in matrix products (2 FLOPs per weight per row)
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    elt: int  # bytes per element of keys and values

    @classmethod
    def of(cls, adapter: ModelAdapter) -> ModelCost:
        tc = adapter.text_config
        heads = tc.num_attention_heads
        kvh = getattr(tc, "num_key_value_heads", None) or heads
        d = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        embed = adapter.embed.weight
        unembed = adapter.unembed.weight
        text = {id(p): p for p in adapter.text_model.parameters()}
        text[id(unembed)] = unembed
        # the embedding table is read one row per token, not whole (unless tied to the unembedding)
        read = [p for k, p in text.items() if k != id(embed) or embed is unembed]
        matmul = [p for p in read if p.dim() >= 2]
        return cls(
            weight_bytes=sum(p.numel() * p.element_size() for p in read),
            matmul_params=sum(p.numel() for p in matmul),
            n_layers=adapter.n_layers, heads=heads, kv_heads=kvh, head_dim=d,
            elt=torch.empty((), dtype=adapter.dtype).element_size(),
        )

    def step(self, rows: int, prompt_len: int, t: int) -> tuple[float, float]:
        """(bytes, FLOPs) of decode step t for `rows` rows over one prompt of prompt_len."""
        keys = prompt_len + t  # the prompt prefix and the row's own suffix so far
        kv_bytes = 2 * self.n_layers * self.kv_heads * self.head_dim * self.elt * (prompt_len + rows * (t + 1))
        flops = 2 * self.matmul_params * rows + 4 * self.n_layers * self.heads * self.head_dim * rows * keys
        return float(self.weight_bytes + kv_bytes), float(flops)

    def prefill(self, prompt_len: int) -> tuple[float, float]:
        """(bytes, FLOPs) of the prompt's prefill (causal attention: half the square)."""
        kv_bytes = 2 * self.n_layers * self.kv_heads * self.head_dim * self.elt * prompt_len
        flops = 2 * self.matmul_params * prompt_len + 2 * self.n_layers * self.heads * self.head_dim * prompt_len**2
        return float(self.weight_bytes + kv_bytes), float(flops)


def floor_s(cost: tuple[float, float], peaks: Peaks) -> float:
    """One pass's floor: the slower of reading its bytes and doing its arithmetic."""
    return max(cost[0] / peaks.bandwidth, cost[1] / peaks.flops)


def sweep_limit(model: ModelCost, peaks: Peaks, prompt_len: int, rows: int, steps: int,
                clips: int = 1) -> dict[str, Any]:
    """The physical limit of `clips` clips' sweeps (each: one prefill, then `rows` condition rows
    for `steps` steps), the clips' rows decoded together: the weights are read once per step
    for all of them, the keys and values of every clip. Seconds, with the per-step figures."""
    pre = model.prefill(prompt_len)
    step_s, step_bytes, step_flops = [], [], []
    for t in range(steps):
        b, f = model.step(rows, prompt_len, t)
        # clips share the weight reads; their keys, values and arithmetic add up
        b = b + (clips - 1) * (b - model.weight_bytes)
        f = f * clips
        step_bytes.append(b)
        step_flops.append(f)
        step_s.append(floor_s((b, f), peaks))
    prefill_s = clips * floor_s(pre, peaks)
    return {
        "seconds": prefill_s + sum(step_s), "prefill_s": prefill_s, "decode_s": sum(step_s),
        "step_bytes_first": step_bytes[0], "step_flops_first": step_flops[0],
        "step_s_first": step_s[0], "bound": "memory" if step_bytes[0] / peaks.bandwidth >= step_flops[0] / peaks.flops
        else "compute",
        "clips": clips, "rows_per_clip": rows, "steps": steps, "prompt_len": prompt_len,
        "weight_bytes": model.weight_bytes,
    }

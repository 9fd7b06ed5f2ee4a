"""Logit lens at audio positions: decode each layer's hidden state with the unembedding.

`use_norm=True` (default) applies the model's final norm first, as the model itself does
before its unembedding; `use_norm=False` is the paper's released variant (no norm). The
choice is recorded with every result. Hidden states are gathered by forward hooks at the
chosen positions only, during the engine's prefill: no extra pass, no full [L, P, D] tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from avprobe.adapters.base import ModelAdapter


@dataclass(frozen=True)
class LensConfig:
    top_k: int = 5
    use_norm: bool = True  # False = the paper's released code (no final norm)
    concept_ids: tuple[int, ...] = ()  # token ids whose probability is recorded at every position
    chunk: int = 256  # positions decoded at once (bounds the [chunk, vocab] logits)


@dataclass
class LensResult:
    """top_ids: [L, A, k] int32; top_probs: [L, A, k]; concept_probs: [L, A, C] (C may be 0)."""

    use_norm: bool
    positions: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    concept_ids: tuple[int, ...] = ()
    concept_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))


@contextmanager
def capture_hidden(adapter: ModelAdapter, positions: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on every decoder layer keeping the output at `positions` ([A] indices)."""
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make(i: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            store[i] = h[0, positions.to(h.device)].detach()

        return hook

    for i, layer in enumerate(adapter.layers):
        handles.append(layer.register_forward_hook(make(i)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def decode_hidden(adapter: ModelAdapter, hidden: dict[int, torch.Tensor], positions: torch.Tensor,
                  config: LensConfig) -> LensResult:
    """Unembed captured hidden states ([A, D] per layer) into top-k tokens and concept probs."""
    L = adapter.n_layers
    A = int(positions.numel())
    k = config.top_k
    top_ids = np.zeros((L, A, k), np.int32)
    top_probs = np.zeros((L, A, k), np.float32)
    C = len(config.concept_ids)
    cprobs = np.zeros((L, A, C), np.float32)
    cids = torch.tensor(config.concept_ids, dtype=torch.long, device=adapter.device)
    for layer in range(L):
        h = hidden[layer]
        for s in range(0, A, config.chunk):
            x = h[s : s + config.chunk]
            if config.use_norm:
                x = adapter.final_norm(x)
            logp = torch.log_softmax(adapter.logits(x).float(), dim=-1)  # the family's head (e.g. a softcap)
            p, i = logp.topk(k, dim=-1)
            top_ids[layer, s : s + len(x)] = i.cpu().numpy()
            top_probs[layer, s : s + len(x)] = p.exp().cpu().numpy()
            if C:
                cprobs[layer, s : s + len(x)] = logp[:, cids].exp().cpu().numpy()
    return LensResult(
        use_norm=config.use_norm,
        positions=positions.cpu().numpy().astype(np.int32),
        top_ids=top_ids,
        top_probs=top_probs,
        concept_ids=tuple(config.concept_ids),
        concept_probs=cprobs,
    )


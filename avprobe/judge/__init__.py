"""Fidelity judges: audio and video fidelity of a caption against a reference, in [0, 1].

Backends, chosen by a spec string (`make_judge`):

- ``concept``: exact set overlap for the organisms' closed caption grammar (their default);
- ``openai[:MODEL]``: rubric LLM judge over any OpenAI-compatible chat endpoint;
- ``transformers:MODEL_OR_PATH``: the same rubric on a local chat model;
- ``embedding``: MiniLM cosine similarity, an offline and weaker proxy.

A judgment that could not be made is a NaN `Score`: counted as unscored, never scored 0.
"""

from __future__ import annotations

import inspect
from typing import Any

from avprobe.judge.base import (
    CACHE_NAMESPACE,
    ERROR_INTERNAL,
    ERROR_PARSE,
    ERROR_REFERENCE,
    ERROR_TRANSPORT,
    MODALITIES,
    Judge,
    JudgeCache,
    JudgeItem,
    Score,
    ScoreSummary,
    summarize,
)
from avprobe.judge.concept import ConceptJudge, parse_caption
from avprobe.judge.prompts import PROMPT_VERSION, build_messages, parse_reply

BACKENDS = ("concept", "openai", "transformers", "embedding")

__all__ = [
    "BACKENDS",
    "CACHE_NAMESPACE",
    "ERROR_INTERNAL",
    "ERROR_PARSE",
    "ERROR_REFERENCE",
    "ERROR_TRANSPORT",
    "MODALITIES",
    "PROMPT_VERSION",
    "ConceptJudge",
    "Judge",
    "JudgeCache",
    "JudgeItem",
    "Score",
    "ScoreSummary",
    "build_messages",
    "make_judge",
    "parse_caption",
    "parse_reply",
    "summarize",
]


def _backend_class(backend: str) -> type[Judge]:
    # Imported on demand: the HTTP judge needs no torch, the local one needs transformers.
    if backend == "concept":
        return ConceptJudge
    if backend == "openai":
        from avprobe.judge.openai import OpenAIJudge

        return OpenAIJudge
    if backend == "transformers":
        from avprobe.judge.hf import TransformersJudge

        return TransformersJudge
    if backend == "embedding":
        from avprobe.judge.embedding import EmbeddingJudge

        return EmbeddingJudge
    raise ValueError(
        f"unknown judge {backend!r}; expected one of: concept, openai[:MODEL], transformers:MODEL_OR_PATH, embedding"
    )


def make_judge(spec: str, **options: Any) -> Judge:
    """Build a judge from a spec: ``concept``, ``openai[:MODEL]``, ``transformers:MODEL``,
    ``embedding``.

    `options` go to the backend's constructor (e.g. ``cache=store``, ``base_url=...``,
    ``max_workers=4``); options that are None are dropped, so CLI flags left unset fall back
    to the backend's defaults and environment. An option the backend does not take is an
    error naming the accepted ones.
    """
    backend, _, model = spec.strip().partition(":")  # model names may hold ':' (ollama tags)
    cls = _backend_class(backend)
    options = {k: v for k, v in options.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        accepted = sorted(p for p in params if p != "self" and p != "model")
        raise TypeError(f"judge {backend!r} does not take option(s) {unknown}; it accepts {accepted}")
    if model:
        if "model" not in params:
            raise ValueError(f"judge {backend!r} takes no model, got spec {spec!r}")
        options["model"] = model
    elif backend == "transformers":
        raise ValueError("the transformers judge needs a model: --judge transformers:MODEL_ID_OR_PATH")
    return cls(**options)
